"""Test modules that run in a process of their own (``tests/test_isolated.py`` runs them), not in the suite's.

In the suite's long-lived process, OpenVINO's in-process inference in these modules was followed, modules later,
by a segfault in unrelated Python code (``int()`` on a corrupted object; in ``waitpid`` with ``si_code``
SI_KERNEL). The cause, found with gdb: OpenVINO's CPU plugin swaps the thread's alternate signal stack for its
own at each compile and puts back the one it replaced when the model is destroyed, so destroying models in the
order they were made leaves the thread on a freed stack, and the next signal Python handles (SIGCHLD from a
DataLoader's or a subprocess's child) writes its frame there. ``deploy.sigaltstack`` now guards every
``OpenVinoSession``; ``tests/test_sigaltstack.py`` checks it in a child process. With the guard the
reproducing modules (test_backends, test_data_dataset, test_data_coco) pass in one process; these two modules
still run apart, as a second line of defence for models compiled outside a session (their tests compile some).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "LDD_TEST_ISOLATED"
MODULES = ("test_backends.py", "test_bf16.py")


def in_own_process(module_file: str) -> pytest.MarkDecorator:
    """``pytestmark`` of an isolated module: its tests run only in the process ``tests/test_isolated.py`` starts."""
    name = Path(module_file).name
    return pytest.mark.skipif(
        os.environ.get(ENV) != name, reason=f"{name} runs in a process of its own (tests/test_isolated.py)"
    )
