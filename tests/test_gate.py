import math

import pytest

from resnet_slim.gate import evaluate_gate
from resnet_slim.params import GateParams

GOOD = {"teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": 44.0},
        "release": {"top1": 97.5, "p50_ms": 0.4, "size_mb": 1.0}}
# point: these tests are about thresholds on the measured numbers; the CI statistic is in test_stats.py
GATE = GateParams(release="release", reference="teacher", max_acc_drop_pp=1.0, min_speedup=10.0,
                  max_size_ratio=0.05, acc_drop_statistic="point")


def _failed_names(verdict):
    return {c["name"] for c in verdict["checks"] if not c["passed"]}


def test_passes_when_every_threshold_is_met():
    verdict = evaluate_gate(GOOD, GATE)
    assert verdict["passed"] and verdict["failed"] == []
    speedup = next(c for c in verdict["checks"] if c["name"] == "latency_speedup")
    assert speedup["measured"] == pytest.approx(20.0)


def test_names_every_failed_check():
    results = {"teacher": GOOD["teacher"], "release": {"top1": 95.0, "p50_ms": 4.0, "size_mb": 11.0}}
    verdict = evaluate_gate(results, GATE)
    assert not verdict["passed"]
    assert _failed_names(verdict) == {"accuracy_drop_pp", "latency_speedup", "size_ratio"}
    assert any("3 pp is not <= 1.0" in f for f in verdict["failed"])


def test_tightened_threshold_fails_a_model_that_passed():
    verdict = evaluate_gate(GOOD, GATE.model_copy(update={"max_acc_drop_pp": -1.0}))
    assert _failed_names(verdict) == {"accuracy_drop_pp"}


def test_absolute_size_cap_is_optional():
    verdict = evaluate_gate(GOOD, GATE.model_copy(update={"max_size_mb": 0.5}))
    assert _failed_names(verdict) == {"size_mb"}


@pytest.mark.parametrize("broken, reason", [
    ({"release": None}, "no benchmark results for model 'release'"),
    ({"release": {"top1": 97.5, "size_mb": 1.0}}, "release.p50_ms is missing"),
    ({"release": {"top1": math.nan, "p50_ms": 0.4, "size_mb": 1.0}}, "release.top1 is nan"),
    ({"release": {"top1": "97", "p50_ms": 0.4, "size_mb": 1.0}}, "not a number"),
    ({"release": {"top1": True, "p50_ms": 0.4, "size_mb": 1.0}}, "not a number"),
    ({"release": {"top1": 97.5, "p50_ms": 0.0, "size_mb": 1.0}}, "release.p50_ms is 0.0, must be > 0"),
    ({"teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": -1.0}}, "teacher.size_mb is -1.0, must be > 0"),
    ({"teacher": {}}, "teacher.top1 is missing"),
])
def test_fails_closed_on_missing_or_malformed_metrics(broken, reason):
    results = {**GOOD, **broken}
    results = {k: v for k, v in results.items() if v is not None}
    verdict = evaluate_gate(results, GATE)
    assert not verdict["passed"]
    assert any(reason in f for f in verdict["failed"]), verdict["failed"]


AUTO = GATE.model_copy(update={"release": "auto", "candidates": ["slow", "fast", "inaccurate"]})
CANDIDATES = {"teacher": GOOD["teacher"],
              "slow": {"top1": 98.0, "p50_ms": 0.7, "size_mb": 1.0},
              "fast": {"top1": 97.9, "p50_ms": 0.3, "size_mb": 1.0},
              "inaccurate": {"top1": 90.0, "p50_ms": 0.1, "size_mb": 0.5}}


def test_auto_release_picks_the_fastest_candidate_that_passes():
    verdict = evaluate_gate(CANDIDATES, AUTO)
    assert verdict["passed"] and verdict["release"] == "fast"
    assert "fastest of 2 candidate(s)" in verdict["selection"]["why"]
    assert [c["passed"] for c in verdict["selection"]["candidates"]] == [True, True, False]


def test_auto_release_fails_when_no_candidate_passes_and_names_every_failure():
    results = {**CANDIDATES, "slow": {**CANDIDATES["slow"], "top1": 50.0},
               "fast": {"top1": 97.9, "p50_ms": 0.3}}
    verdict = evaluate_gate(results, AUTO)
    assert not verdict["passed"] and verdict["selection"]["why"] == "no candidate passed every check"
    failed = " ".join(verdict["failed"])
    assert "slow: accuracy_drop_pp" in failed and "fast: size_ratio: metric fast.size_mb is missing" in failed
    assert "inaccurate: accuracy_drop_pp" in failed


def test_auto_release_without_candidates_fails_closed():
    verdict = evaluate_gate(CANDIDATES, AUTO.model_copy(update={"candidates": []}))
    assert not verdict["passed"] and "candidates is empty" in verdict["failed"][0]
