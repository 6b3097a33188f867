"""../shared (beside the repository) holds data and schemas the tests read but never copy in."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_or_skip(*parts: str) -> Path:
    """The path under ../shared; skip with one line where it is absent (a clone elsewhere), fail under CI."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        why = f"{path} is absent: clone the repository beside shared/"
        if os.environ.get("MEMR2_CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path
