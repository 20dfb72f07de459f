"""The one statistics rule (``core.stats``, DESIGN section 3): Student's t quantiles against the printed tables,
paired intervals worked by hand for n = 2 and n = 3, the verdicts (significant, met, inside noise), and the
regenerated ablation verdicts in ``bench/results`` against the function applied to their stored per-seed values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core import comparison
from core.stats import betainc, interval, paired, t_cdf, t_quantile

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.mark.parametrize(
    ("p", "df", "want"),
    [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 10, 2.228),
     (0.975, 30, 2.042), (0.95, 5, 2.015), (0.995, 2, 9.925), (0.025, 2, -4.303)],
)  # fmt: skip
def test_t_quantiles_match_the_printed_table(p: float, df: int, want: float) -> None:
    assert t_quantile(p, df) == pytest.approx(want, abs=5e-4)


def test_t_distribution_closed_forms() -> None:
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0, 40.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - (0.6^4 + 4 * 0.4 * 0.6^3), binomial sum
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_interval_by_hand_n2_and_n3() -> None:
    # n = 2: differences +1 and +3 -> mean 2, sd sqrt(2), half-width 12.706 * sqrt(2) / sqrt(2) = 12.706.
    two = paired({0: 11.0, 1: 13.0}, {0: 10.0, 1: 10.0})
    assert (two.n, two.mean, two.std) == (2, 2.0, pytest.approx(math.sqrt(2)))
    assert two.half_width == pytest.approx(12.7062, abs=1e-4)
    assert (two.low, two.high) == (pytest.approx(-10.7062, abs=1e-4), pytest.approx(14.7062, abs=1e-4))
    assert two.significant is False and two.verdict(2.0) == "inside noise"
    # n = 3: differences 2, 3, 4 -> mean 3, sd 1, half-width 4.3027 / sqrt(3) = 2.4841; [0.516, 5.484].
    three = paired({0: 12.0, 1: 13.0, 2: 14.0, 7: 99.0}, {0: 10.0, 1: 10.0, 2: 10.0})  # seed 7 has no pair
    assert (three.n, three.mean, three.std) == (3, 3.0, 1.0)
    assert three.half_width == pytest.approx(2.48414, abs=1e-5) and three.low == pytest.approx(0.51586, abs=1e-5)
    assert three.significant is True
    assert three.verdict(2.0) == "met" and three.verdict(3.0) == "met" and three.verdict(3.5) == "not met"
    # A negative gain whose interval excludes 0 is significant too (a loss), and meets no positive goal.
    loss = interval([-2.0, -3.0, -4.0])
    assert loss.significant is True and loss.verdict(0.0) == "not met"
    # A cost under a ceiling: met only when the whole interval is below it.
    assert three.verdict_below(6.0) == "met" and three.verdict_below(4.0) == "inside noise"
    assert three.verdict_below(0.5) == "not met" and two.verdict_below(10.0) == "inside noise"
    # One pair: a mean, no spread, no verdict.
    one = paired({0: 5.0}, {0: 1.0})
    assert (one.n, one.mean, one.std, one.half_width) == (1, 4.0, None, None)
    assert one.significant is None and one.verdict(1.0) == "one pair" and one.verdict_below(1.0) == "one pair"
    assert interval([]).n == 0 and interval([]).mean is None


@pytest.mark.parametrize(
    ("name", "want"),
    [
        # The recomputation (AP points, 95% half-width): synthetic (e) is no longer a pass.
        ("ablation", {"e": (2.3, 4.4, "inside noise"), "g": (2.5, 1.4, "met"), "d": (2.1, 5.1, "inside noise")}),
        ("ablation_bccd", {"d": (3.0, 3.7, "inside noise"), "e": (3.9, 1.3, "met"), "f": (0.4, 3.9, "not met")}),
    ],
)
def test_regenerated_ablation_verdicts_match_the_function(name: str, want: dict[str, tuple]) -> None:
    summary = json.loads((RESULTS / f"{name}.json").read_text())
    rows = summary["rows"]
    base = dict(enumerate(rows["a"]["AP"]["values"]))
    md = (RESULTS / f"{name}.md").read_text()
    for key, r in rows.items():
        if key == "a":
            continue
        gain = paired(dict(enumerate(r["AP"]["values"])), base)
        stored = r["gain"]
        assert stored["mean"] == pytest.approx(gain.mean) and stored["half_width"] == pytest.approx(gain.half_width)
        assert r["significant"] is gain.significant and r["verdict_2AP"] == gain.verdict(0.02)
        line = next(x for x in md.splitlines() if x.startswith(f"- ({key}) "))
        assert f"{100 * gain.mean:+.1f} ± {100 * gain.half_width:.1f}" in line and f"**{gain.verdict(0.02)}**" in line
        assert comparison.gain_cell(r) in md
        if key in want:
            assert (round(100 * gain.mean, 1), round(100 * gain.half_width, 1), gain.verdict(0.02)) == want[key]
