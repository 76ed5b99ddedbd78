"""When pre-copy has done enough: the convergence decision.

The stop-copy window is the device downtime. It is estimated as the state
still to send divided by the measured transfer rate; pre-copy continues
while that estimate exceeds the policy's ``downtimeLimitMs``, within bounds
on iterations and time. Pure: the PreCopy phase feeds it the agents' numbers.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class Decision(enum.Enum):
    CONTINUE = "Continue"  # keep pre-copying
    STOP_AND_COPY = "StopAndCopy"  # converged (or forced): stop the VM and send the rest
    NOT_CONVERGED = "NotConverged"  # bounds hit and policy says Abort


@dataclasses.dataclass(frozen=True)
class Verdict:
    decision: Decision
    estimated_downtime_ms: float | None
    message: str


def decide(
    remaining_bytes: int,
    throughput_bytes_per_s: float,
    dirty_rate_bytes_per_s: float,
    iterations: int,
    elapsed_s: float,
    policy: Mapping[str, Any],
) -> Verdict:
    limit_ms = float(policy.get("downtimeLimitMs", 300))
    max_iter = int(policy.get("maxPreCopyIterations", 30))
    max_s = float(policy.get("preCopyTimeoutSeconds", 300))
    force = policy.get("onNonConvergence", "Abort") == "ForceStopCopy"

    if iterations == 0:
        # No round finished: the device has not yet said what it holds.
        return Verdict(Decision.CONTINUE, None, "pre-copy started: waiting for the first round")
    est_ms = (
        remaining_bytes / throughput_bytes_per_s * 1000.0 if throughput_bytes_per_s > 0 else None
    )
    if remaining_bytes == 0 or (est_ms is not None and est_ms <= limit_ms):
        return Verdict(
            Decision.STOP_AND_COPY,
            0.0 if remaining_bytes == 0 else est_ms,
            f"converged: {remaining_bytes} B left, estimated stop-copy "
            f"{(est_ms or 0.0):.0f} ms <= limit {limit_ms:.0f} ms",
        )
    over = []
    if iterations >= max_iter:
        over.append(f"{iterations} iterations >= maxPreCopyIterations {max_iter}")
    if elapsed_s >= max_s:
        over.append(f"{elapsed_s:.0f} s >= preCopyTimeoutSeconds {max_s:.0f}")
    est = "unknown (no throughput measured yet)" if est_ms is None else f"{est_ms:.0f} ms"
    why = f"estimated stop-copy {est} > limit {limit_ms:.0f} ms"
    if throughput_bytes_per_s > 0 and dirty_rate_bytes_per_s >= throughput_bytes_per_s:
        why += (
            f"; the device dirties {dirty_rate_bytes_per_s:.0f} B/s, at least the "
            f"{throughput_bytes_per_s:.0f} B/s sent, so more rounds cannot help"
        )
    if not over:
        return Verdict(Decision.CONTINUE, est_ms, f"pre-copy continues: {why}")
    if force:
        return Verdict(
            Decision.STOP_AND_COPY,
            est_ms,
            f"not converged ({'; '.join(over)}; {why}); onNonConvergence=ForceStopCopy: "
            "stopping anyway, downtime will exceed the limit",
        )
    return Verdict(Decision.NOT_CONVERGED, est_ms, f"not converged: {'; '.join(over)}; {why}")
