"""What ``bench/results/`` holds can be trusted (DESIGN section 7, "Honest figures"; issue 23):

- the ablation bench and a study given the same rows and seeds print the same comparison table: both run the one
  comparison engine (``core.comparison``): the ablation through ``bench/ablation_report.summarise`` on its own job
  specs, the study through ``core.studies.plan`` (rows named as the bench names them) and ``core.study_report``;
- every file records the commit, the date, the machine and the load it was measured at: a ``.json`` as the
  ``provenance`` key, a ``.md`` as a ``Provenance:`` line, a ``.png`` through the ``.json`` of the same name beside
  it or its folder's ``provenance.json``; a folder's ``README.md`` describes the files and is not itself a result;
- ``bench/results/README.md`` names every file there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from core import study_report
from core.studies import MethodRow, StudySpec, plan
from core.study_report import PLAIN_ROW
from distill.spec import DistillSpec

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))  # the bench scripts import their neighbours by name, as `python bench/x.py` does

import ablation_plan  # noqa: E402
import ablation_report  # noqa: E402

REQUIRED = ("commit", "date", "machine", "load")


def _table(md: str) -> list[str]:
    """The comparison engine's table in a report: from its header to the first line that is not a table row."""
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| row | AP | AP50 | AP75 | seeds |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_ablation_bench_and_a_study_print_the_same_table(tmp_path: Path) -> None:
    # Per-seed results of four rows over three seeds (BCCD's stored values: no training needed, the table is a
    # pure function of them), with seed 2 of (d) failed: the study has no result there, the bench no run.
    stored = json.loads((RESULTS / "ablation_bccd.json").read_text())["rows"]
    keys = "adeg"
    bbox = {(k, s): {m: stored[k][m]["values"][s] for m in ("AP", "AP50", "AP75")} for k in keys for s in range(3)}
    del bbox["d", 2]

    bench_plan = ablation_plan.Plan(rows=keys, seeds=3)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    for (k, s), b in bbox.items():
        spec = ablation_plan.job_spec(bench_plan, tmp_path, k, s, tmp_path / "teacher.pt")
        runs[k].append({"bbox": b, "spec": spec, "wall_s": 1.0})
    teacher = {"bbox": {"AP": 0.41, "AP50": 0.64, "AP75": 0.52}}
    bench_md = ablation_report.markdown(ablation_report.summarise(bench_plan, runs, teacher, 60.0))

    names = {k: ablation_plan.ROWS[k][0] for k in keys}
    assert names["a"] == PLAIN_ROW  # the bench's baseline is the studies' plain student
    methods = [MethodRow(name=names[k], distill=DistillSpec.model_validate(ablation_plan.ROWS[k][1])) for k in "deg"]
    spec = StudySpec(dataset="ds_0123456789abcdef", teacher={"job": "job_0123456789abcdef"}, methods=methods, seeds=3)
    by_name = {v: k for k, v in names.items()}
    members = []
    for i, p in enumerate(plan(spec)):
        b = bbox.get((by_name[p.row], p.seed))
        members.append({"row": p.row, "method": p.method, "seed": p.seed, "job_id": f"job_{i}",
                        "state": "succeeded" if b else "failed", "metrics": {"bbox": b} if b else None,
                        "model_id": f"mdl_{i}" if b else None, "error": None if b else "diverged"})  # fmt: skip
    report = study_report.build("st_0123456789abcdef", members)
    study_md = study_report.markdown({"id": "st_0123456789abcdef", "spec": spec.model_dump()}, report)

    table = _table(bench_md)
    assert table == _table(study_md)
    assert len(table) == 2 + 4 and table[2].startswith(f"| {PLAIN_ROW} | 33.2 ± 0.1 |")
    # (d) over the two seeds it has: +3.96, +1.31 -> +2.6 ± 12.706 * 1.87 / sqrt(2) = ± 16.8; (e) over three.
    assert "| Main LD + VLR LD | 35.8 ± 1.9 |" in table[3] and "| 2 | +2.6 ± 16.8 (sd 1.9) |" in table[3]
    assert table[4].endswith("| 3 | +3.9 ± 1.3 (sd 0.5) | [+2.6, +5.2] | yes |")


def _results() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file())


def _has_provenance(data: Any) -> bool:
    prov = data.get("provenance") if isinstance(data, dict) else None
    return isinstance(prov, dict) and all(isinstance(prov.get(k), str | dict) and prov.get(k) for k in REQUIRED)


@pytest.mark.parametrize("path", _results(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_result_records_its_provenance(path: Path) -> None:
    if path.name in ("README.md", "provenance.json"):
        return  # a folder's description, and the record of its screenshots' provenance (checked with each .png)
    if path.suffix == ".json":
        assert _has_provenance(json.loads(path.read_text())), f"{path.name}: no provenance with {REQUIRED}"
    elif path.suffix == ".md":
        line = next((x for x in path.read_text().splitlines() if x.startswith("Provenance: ")), "")
        assert all(f"{k} " in line for k in REQUIRED), f"{path.name}: no 'Provenance: commit .., date .., ..' line"
    elif path.suffix == ".png":
        sibling = path.with_suffix(".json")
        folder = path.parent / "provenance.json"
        if sibling.is_file():
            assert _has_provenance(json.loads(sibling.read_text())), f"{path.name}: {sibling.name} has none"
        else:
            assert folder.is_file(), f"{path.name}: neither {sibling.name} nor provenance.json beside it"
            entry = json.loads(folder.read_text())["files"].get(path.name)
            assert _has_provenance({"provenance": entry}), f"{path.name}: not in {folder.name}"
    else:
        pytest.fail(f"{path.name}: results are .json, .md or .png")


def test_the_results_readme_names_every_file() -> None:
    readme = (RESULTS / "README.md").read_text()
    stems = {str(p.relative_to(RESULTS).with_suffix("")) for p in _results() if p.parent == RESULTS}
    missing = sorted(s for s in stems if f"`{s}" not in readme and s != "README")
    assert not missing, f"bench/results/README.md does not describe {missing}"
