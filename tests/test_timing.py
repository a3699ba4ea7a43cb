"""Models timed side by side in shuffled rounds; speed-ups as the median of per-round ratios with a
bootstrap CI; the gate's speed check on the point or the lower end of that CI."""

import numpy as np
import pytest

from resnet_slim import stats
from resnet_slim.gate.gate import evaluate_gate, speedup_sentence
from resnet_slim.gate.metrics import headline_metrics, speedup
from resnet_slim.measure import timing
from resnet_slim.params import GateParams


def test_round_order_is_shuffled_and_reproducible():
    names = [f"m{i}" for i in range(6)]
    orders = timing.round_orders(names, rounds=20, seed=0)
    assert orders == timing.round_orders(names, rounds=20, seed=0)  # the same every run
    assert all(sorted(order) == names for order in orders)  # every model once per round
    assert len({tuple(order) for order in orders}) > 10  # a fresh shuffle each round
    assert timing.round_orders(names, rounds=20, seed=1) != orders


def test_time_in_rounds_calls_in_each_rounds_order_with_its_warmups():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times, orders = timing.time_in_rounds(
        fns, rounds=4, runs_per_round=3, warmup=2, round_warmup=1, seed=7
    )
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # the warm-up, once per model
    per_turn = 1 + 3  # round_warmup + runs_per_round
    turns = [calls[6 + i * per_turn] for i in range(4 * 3)]
    assert turns == [name for order in orders for name in order]
    assert orders == timing.round_orders(["a", "b", "c"], rounds=4, seed=7)
    assert {k: v.shape for k, v in times.items()} == {k: (4, 3) for k in "abc"}


def test_a_load_spike_that_slows_a_round_cancels_in_its_ratio():
    # synthetic: the teacher 10 ms, the release 2 ms; rounds 3 and 7 were twice as slow for both
    teacher, release = np.full((20, 5), 10.0), np.full((20, 5), 2.0)
    teacher[[3, 7]] *= 2
    release[[3, 7]] *= 2
    r = stats.ratio_of_rounds(timing.round_medians(teacher), timing.round_medians(release))
    assert r["ratio"] == pytest.approx(5.0) and r["ci_low"] == r["ci_high"] == pytest.approx(5.0)
    assert r["rounds"] == 20
    # noise is reported, not hidden: 2 of 20 rounds were > 20 % over the median
    assert timing.noise(release)["slow_round_fraction"] == pytest.approx(0.1)
    assert timing.noise(release)["round_cv"] > 0.2


def test_the_ratio_ci_comes_from_the_rounds():
    rng = np.random.default_rng(0)
    ratios = rng.normal(4.0, 0.4, size=40)
    release = rng.uniform(1.0, 2.0, size=40)  # absolute times move; the ratio is what counts
    r = stats.ratio_of_rounds(release * ratios, release, resamples=4000, seed=3)
    assert r["ratio"] == pytest.approx(float(np.median(ratios)))
    assert r["ci_low"] < r["ratio"] < r["ci_high"]
    assert 3.7 < r["ci_low"] and r["ci_high"] < 4.3  # ~ median ± 2 standard errors
    assert stats.ratio_of_rounds(release * ratios, release, resamples=4000, seed=3) == r
    with pytest.raises(ValueError, match="same 2\\+ rounds"):
        stats.ratio_of_rounds([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        stats.ratio_of_rounds([1.0, 0.0], [1.0, 1.0])


def _results(release_ratios, teacher_ms=8.0):
    """Rows with per-round medians: the release `teacher_ms / ratio` in each round."""
    rounds = [teacher_ms] * len(release_ratios)
    release = [teacher_ms / r for r in release_ratios]
    return {
        "teacher": {"top1": 90.0, "p50_ms": teacher_ms, "size_mb": 40.0, "round_p50_ms": rounds},
        "release": {
            "top1": 90.0,
            "p50_ms": float(np.median(release)),
            "size_mb": 1.0,
            "round_p50_ms": release,
        },
    }


GATE = GateParams(release="release", reference="teacher", min_speedup=4.0, max_size_ratio=0.5)
STRADDLING = [3.0, 3.5, 4.5, 5.0] * 5  # median 4.0-4.5, CI from ~3.5 to ~4.5: straddles 4x
ABOVE = [4.6, 4.8, 5.0, 5.2] * 5


def _speed(verdict):
    return next(c for c in verdict["checks"] if c["name"] == "latency_speedup")


def test_lower_ci_fails_a_speedup_whose_interval_straddles_the_threshold():
    point = evaluate_gate(_results(STRADDLING), GATE)
    lower = evaluate_gate(
        _results(STRADDLING), GATE.model_copy(update={"speedup_statistic": "lower_ci"})
    )
    assert point["passed"] and _speed(point)["measured"] >= 4.0
    assert not lower["passed"] and lower["failed"][0].startswith("latency_speedup")
    check = _speed(lower)
    assert check["ci"][0] < 4.0 <= check["ci"][1] and check["measured"] == check["ci"][0]
    assert check["decidable"] is False and check["basis"] == "interleaved rounds"
    assert check["rounds"] == 20 and check["point"] >= 4.0
    assert "too noisy to resolve" in speedup_sentence(check)


def test_lower_ci_passes_a_speedup_above_the_threshold_and_records_the_interval():
    verdict = evaluate_gate(
        _results(ABOVE), GATE.model_copy(update={"speedup_statistic": "lower_ci"})
    )
    check = _speed(verdict)
    assert verdict["passed"] and check["decidable"] is True
    assert 4.0 <= check["ci"][0] <= check["point"] <= check["ci"][1]
    assert "with 95% confidence" in speedup_sentence(check)


def test_lower_ci_without_rounds_fails_closed_and_point_falls_back_to_the_p50s():
    results = _results(ABOVE)
    del results["release"]["round_p50_ms"]
    lower = evaluate_gate(results, GATE.model_copy(update={"speedup_statistic": "lower_ci"}))
    assert not lower["passed"] and "no per-round times for ['release']" in lower["failed"][0]
    point = _speed(evaluate_gate(results, GATE))
    assert point["passed"] and point["basis"].startswith("ratio of p50s") and "ci" not in point


def test_malformed_rounds_fail_the_speed_check():
    results = _results(ABOVE)
    results["release"]["round_p50_ms"] = ["fast"] * 20
    assert "not a list of numbers" in evaluate_gate(results, GATE)["failed"][0]
    results["release"]["round_p50_ms"] = [1.0] * 19  # not the reference's rounds
    assert "cannot pair the rounds" in evaluate_gate(results, GATE)["failed"][0]


def test_auto_release_picks_the_fastest_by_the_per_round_ratio():
    results = _results(ABOVE)
    faster = _results([r * 2 for r in ABOVE])["release"]
    results["faster"] = {**faster, "p50_ms": results["release"]["p50_ms"] * 2}  # p50 says slower
    g = GATE.model_copy(update={"release": "auto", "candidates": ["release", "faster"]})
    verdict = evaluate_gate(results, g)
    assert verdict["release"] == "faster"
    picked = next(c for c in verdict["selection"]["candidates"] if c["model"] == "faster")
    assert picked["speedup"] == pytest.approx(2 * float(np.median(ABOVE)))
    assert picked["speedup_ci"][0] <= picked["speedup"] <= picked["speedup_ci"][1]


def test_headline_metrics_carry_the_speedup_interval():
    results = _results(ABOVE)
    verdict = evaluate_gate(results, GATE)
    headline = headline_metrics(verdict, results)
    expected = speedup(results, "teacher", "release")
    assert headline["speedup_vs_reference"] == expected["ratio"]
    assert [headline["speedup_vs_reference_ci_low"], headline["speedup_vs_reference_ci_high"]] == (
        expected["ci"]
    )
    assert expected["ci"] == [round(v, 4) for v in _speed(verdict)["ci"]]  # the gate's interval
