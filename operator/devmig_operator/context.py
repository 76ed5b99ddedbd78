"""Everything a step needs, passed in so steps are testable without kopf."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from devmig_operator.cluster import Cluster


@dataclasses.dataclass
class Context:
    cluster: Cluster
    namespace: str
    name: str
    uid: str
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    # Wall clock in seconds since the epoch; injected so tests can fake time.
    clock: Callable[[], float] = time.time
    # Most migrations one node may receive at once (0: no limit).
    max_migrations_per_node: int = 0

    @property
    def who(self) -> str:
        """Identity this migration holds device claims under."""
        return f"{self.namespace}/{self.name}/{self.uid}"

    @property
    def policy(self) -> dict[str, Any]:
        return dict(self.spec.get("policy") or {})
