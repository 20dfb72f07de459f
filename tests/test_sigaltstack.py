"""OpenVINO's CPU plugin and the thread's alternate signal stack (``deploy.sigaltstack``), in child processes: the
plugin leaves a freed stack behind when compiled models are destroyed in the order they were made, and an
``OpenVinoSession`` keeps the thread's own. (The suite's process crashed on exactly this: a SIGCHLD handled on
the freed stack.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A graph with the four outputs a session reads, each the input passed through.
GRAPH = """
import onnx
from onnx import TensorProto, helper
outs = ["boxes", "scores", "labels", "num_detections"]
nodes = [helper.make_node("Identity", ["images"], [o]) for o in outs]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 4]) for o in outs])
data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
"""

CHILD = (
    GRAPH
    + """
import faulthandler, sys
faulthandler.enable()  # a Python-owned alternate stack on this thread, as pytest's and uvicorn's processes have
from deploy.sigaltstack import current
before = current()
if sys.argv[1] == "plugin":
    import openvino as ov
    core = ov.Core()
    a = core.compile_model(core.read_model(data), "CPU")
    b = core.compile_model(core.read_model(data), "CPU")
    del a  # made first, destroyed first: the plugin then puts back a's stack, which this frees
    del b
else:
    from deploy.backends import OpenVinoSession
    a, b = OpenVinoSession(data), OpenVinoSession(data)
    a.run, b.run  # sessions in use
    del a
    del b
print("same" if current() == before else f"changed {before} -> {current()}")
"""
)


def _child(mode: str) -> str:
    run = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_sessions_keep_the_threads_alternate_signal_stack() -> None:
    pytest.importorskip("openvino")
    plugin = _child("plugin")
    if plugin == "same":  # a fixed OpenVINO: nothing to guard against any more, and nothing to show here
        pytest.skip("this OpenVINO's CPU plugin restores the alternate signal stack itself")
    assert plugin.startswith("changed"), plugin  # the plugin's own behaviour: the thread's stack is not ours
    assert _child("session") == "same"
