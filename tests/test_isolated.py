"""Runs the modules of ``tests.isolation.MODULES`` each in a pytest process of its own (see that module for why):
their failures, or a crash of their process, fail here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.isolation import ENV, MODULES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", MODULES)
def test_module_in_its_own_process(module: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "900", f"tests/{module}"],
        cwd=ROOT,
        env={**os.environ, ENV: module},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode in (0, 5), f"exit {run.returncode}\n" + run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout or " skipped" in run.stdout, run.stdout[-2000:]
    print(run.stdout.strip().splitlines()[-1])
