"""Where the tests find data that is not part of the repository.

The team's shared data (real photo sets, the 46 MB mmdetection GFL checkpoint) lives in ``shared/`` beside the
repository, and only there: a user's clone has none, so every test that needs it skips and says why. The small
reference fixtures the parity tests need are copied into ``tests/fixtures/`` and are always present.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def shared_path(relative: str) -> Path:
    """``shared/<relative>`` beside the repository (it may not exist: see :func:`needs_shared`)."""
    return SHARED / relative


def needs_shared(relative: str) -> pytest.MarkDecorator:
    """Skips a test (or module, as ``pytestmark``) when ``shared/<relative>`` is missing, saying where it looked."""
    path = shared_path(relative)
    return pytest.mark.skipif(
        not path.exists(), reason=f"{path} is not present (the team's shared data; a clone has none)"
    )
