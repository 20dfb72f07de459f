"""``python -m deploy export --formats``: an unknown format is an error, before anything is read or written (it
used to be dropped without a word, the export exiting 0 without it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_server import ROOT


def test_an_unknown_format_is_an_error(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "-m", "deploy", "export", str(tmp_path / "none.pt"), str(tmp_path / "out"),
                          "--formats", "fp32,fp64"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "unknown format(s) ['fp64']" in out.stderr and "known: fp32" in out.stderr
    assert not (tmp_path / "out").exists()
