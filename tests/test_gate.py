import math

import pytest

from resnet_slim.gate import evaluate_gate
from resnet_slim.params import GateParams

GOOD = {"teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": 44.0},
        "release": {"top1": 97.5, "p50_ms": 0.4, "size_mb": 1.0}}
GATE = GateParams(release="release", reference="teacher", max_acc_drop_pp=1.0, min_speedup=10.0,
                  max_size_ratio=0.05)


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
    ({"release": {"top1": 97.5, "p50_ms": 0.0, "size_mb": 1.0}}, "not a latency"),
    ({"teacher": {}}, "teacher.top1 is missing"),
])
def test_fails_closed_on_missing_or_malformed_metrics(broken, reason):
    results = {**GOOD, **broken}
    results = {k: v for k, v in results.items() if v is not None}
    verdict = evaluate_gate(results, GATE)
    assert not verdict["passed"]
    assert any(reason in f for f in verdict["failed"]), verdict["failed"]
