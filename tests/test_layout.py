"""The shape of the code base (DESIGN section 1): imports point down a declared layer order and form no cycle,
no file in api/, core/ or worker/ is over 400 lines, and what the API process loads imports without torch.

The import graph is read from the source with ``ast``: imports at module level and inside functions alike
(an import moved into a function still runs, it only hides the cycle), relative imports resolved.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top to bottom: a module imports only from its own room or the rooms below it (README, "Layout").
LAYERS = ("bench", "api", "worker", "core", "deploy", "distill")
# Rooms that are not above one another: the API enqueues through ``core``, never through the worker.
FORBIDDEN = {("api", "worker")}
PACKAGES = ("api", "core", "worker", "distill", "deploy")
MAX_LINES = 400
SMALL_ROOMS = ("api", "core", "worker")


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` (a package is its ``__init__``)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports, anywhere in the file, relative imports made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import submodule``
    return names


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to its longest prefix that is a module)."""
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_cycles_hidden_in_functions_and_relative_imports(tmp_path):
    """The checker itself: a cycle through an import inside a function and a relative import is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(modules(tmp_path, ("pkg",)))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg", "pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_imports_form_no_cycle():
    found = cycles(import_graph(modules()))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(group) for group in found)


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    """Every import that points to a higher room (or to a forbidden one), as ``"a.b -> c.d"``."""
    rank = {room: i for i, room in enumerate(layers)}
    bad = []
    for module, targets in sorted(graph.items()):
        room = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other in rank and room in rank and (rank[other] < rank[room] or (room, other) in FORBIDDEN):
                bad.append(f"{module} -> {target}")
    return bad


def test_imports_point_down_the_layer_order():
    bad = upward_imports(import_graph(modules(ROOT, LAYERS)))
    assert not bad, f"imports against the layer order {' > '.join(LAYERS)}:\n" + "\n".join(bad)


def test_layer_check_fails_on_a_planted_upward_import(tmp_path):
    """A copy of the code with one upward import planted (distill -> core, api -> worker) fails the check."""
    for room in LAYERS:
        subprocess.run(["cp", "-r", str(ROOT / room), str(tmp_path / room)], check=True)
    assert not upward_imports(import_graph(modules(tmp_path, LAYERS)))
    boxes = tmp_path / "distill" / "boxes.py"
    planted = "\n\ndef _planted():\n    from core.settings import Settings\n    return Settings\n"
    boxes.write_text(boxes.read_text() + planted)
    (tmp_path / "api" / "planted.py").write_text("import worker.jobs\n")
    assert upward_imports(import_graph(modules(tmp_path, LAYERS))) == [
        "api.planted -> worker.jobs",
        "distill.boxes -> core.settings",
    ]


def test_no_file_in_api_core_or_worker_is_over_400_lines():
    long = {}
    for room in SMALL_ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long[str(path.relative_to(ROOT))] = n
    assert not long, f"files over {MAX_LINES} lines: {long}"


NO_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    # As on the serving image, where torch is not installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoTorch())
import api.app, deploy.registry, deploy.runtime  # noqa: E401
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
assert not loaded, loaded
try:
    import torch  # noqa: F401
except ImportError:
    print("ok")
"""


def test_api_and_runtime_import_without_torch():
    run = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
