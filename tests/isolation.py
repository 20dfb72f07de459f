"""Test modules that run in a process of their own (``tests/test_isolated.py`` runs them), not in the suite's.

In the suite's long-lived process, OpenVINO's in-process inference in these modules (int8 and bf16 on an
AVX-512 VNNI / AMX CPU) was followed, modules later, by a segfault in unrelated Python code (``int()`` on a
corrupted object, per gdb: a heap corruption). test_backends + test_bf16 + test_data_dataset reproduced it, as
did the suite's first 21 modules, and the same modules without test_backends did not. Until its cause is found
(ASan or valgrind on OpenVINO's CPU plugin), these modules cannot corrupt the suite: a crash fails their runner.
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
