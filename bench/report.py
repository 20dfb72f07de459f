"""Where every benchmark writes its results: ``bench/results/<name>.json`` (the numbers) and ``.md`` (the
table it printed). Imported by the scripts beside it (``python bench/<script>.py`` puts ``bench/`` on the path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, data: Any, markdown: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (``name`` may contain a sub-folder); the ``.md`` path."""
    md_path = RESULTS / f"{name}.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return md_path


def device_tag(device: str) -> str:
    """``cuda`` or ``cpu``: results from the two kinds of machine are kept apart."""
    return "cuda" if device.startswith("cuda") else "cpu"
