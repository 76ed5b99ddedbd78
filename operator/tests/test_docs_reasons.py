"""The user guide's reason table lists every reason the operator writes."""

from __future__ import annotations

import pathlib
import re

from devmig_operator.conditions import Reason

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "user-guide.md"


def test_the_user_guide_explains_every_reason() -> None:
    listed = set(re.findall(r"^\| `([A-Za-z]+)` \|", GUIDE.read_text(), re.M))
    assert {r.value for r in Reason} - listed == set(), "reasons missing from docs/user-guide.md"
    assert listed - {r.value for r in Reason} == set(), "docs list reasons the code does not have"
