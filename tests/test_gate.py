import json
import math

import pytest

from resnet_slim.errors import UserError
from resnet_slim.gate.gate import evaluate_gate
from resnet_slim.params import GateParams
from tests.conftest import GOOD_BENCH, absent_gate_inputs, stage_main, tiny_params

GOOD = {
    "teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": 44.0},
    "release": {"top1": 97.5, "p50_ms": 0.4, "size_mb": 1.0},
}
# point: these tests are about thresholds on the measured numbers;
# the CI statistic is in test_stats.py
GATE = GateParams(
    release="release",
    reference="teacher",
    max_acc_drop_pp=1.0,
    min_speedup=10.0,
    max_size_ratio=0.05,
    acc_drop_statistic="point",
)


def _failed_names(verdict):
    return {c["name"] for c in verdict["checks"] if not c["passed"]}


def test_passes_when_every_threshold_is_met():
    verdict = evaluate_gate(GOOD, GATE)
    assert verdict["passed"] and verdict["failed"] == []
    speedup = next(c for c in verdict["checks"] if c["name"] == "latency_speedup")
    assert speedup["measured"] == pytest.approx(20.0)


def test_names_every_failed_check():
    results = {
        "teacher": GOOD["teacher"],
        "release": {"top1": 95.0, "p50_ms": 4.0, "size_mb": 11.0},
    }
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


@pytest.mark.parametrize(
    "broken, reason",
    [
        ({"release": None}, "no benchmark results for model 'release'"),
        ({"release": {"top1": 97.5, "size_mb": 1.0}}, "release.p50_ms is missing"),
        ({"release": {"top1": math.nan, "p50_ms": 0.4, "size_mb": 1.0}}, "release.top1 is nan"),
        ({"release": {"top1": "97", "p50_ms": 0.4, "size_mb": 1.0}}, "not a number"),
        ({"release": {"top1": True, "p50_ms": 0.4, "size_mb": 1.0}}, "not a number"),
        (
            {"release": {"top1": 97.5, "p50_ms": 0.0, "size_mb": 1.0}},
            "release.p50_ms is 0.0, must be > 0",
        ),
        (
            {"teacher": {"top1": 98.0, "p50_ms": 8.0, "size_mb": -1.0}},
            "teacher.size_mb is -1.0, must be > 0",
        ),
        ({"teacher": {}}, "teacher.top1 is missing"),
    ],
)
def test_fails_closed_on_missing_or_malformed_metrics(broken, reason):
    results = {**GOOD, **broken}
    results = {k: v for k, v in results.items() if v is not None}
    verdict = evaluate_gate(results, GATE)
    assert not verdict["passed"]
    assert any(reason in f for f in verdict["failed"]), verdict["failed"]


AUTO = GATE.model_copy(update={"release": "auto", "candidates": ["slow", "fast", "inaccurate"]})
CANDIDATES = {
    "teacher": GOOD["teacher"],
    "slow": {"top1": 98.0, "p50_ms": 0.7, "size_mb": 1.0},
    "fast": {"top1": 97.9, "p50_ms": 0.3, "size_mb": 1.0},
    "inaccurate": {"top1": 90.0, "p50_ms": 0.1, "size_mb": 0.5},
}


def test_auto_release_picks_the_fastest_candidate_that_passes():
    verdict = evaluate_gate(CANDIDATES, AUTO)
    assert verdict["passed"] and verdict["release"] == "fast"
    assert "fastest of 2 candidate(s)" in verdict["selection"]["why"]
    assert [c["passed"] for c in verdict["selection"]["candidates"]] == [True, True, False]


def test_auto_release_fails_when_no_candidate_passes_and_names_every_failure():
    results = {
        **CANDIDATES,
        "slow": {**CANDIDATES["slow"], "top1": 50.0},
        "fast": {"top1": 97.9, "p50_ms": 0.3},
    }
    verdict = evaluate_gate(results, AUTO)
    assert (
        not verdict["passed"] and verdict["selection"]["why"] == "no candidate passed every check"
    )
    failed = " ".join(verdict["failed"])
    assert (
        "slow: accuracy_drop_pp" in failed
        and "fast: size_ratio: metric fast.size_mb is missing" in failed
    )
    assert "inaccurate: accuracy_drop_pp" in failed


def test_auto_release_without_candidates_fails_closed():
    verdict = evaluate_gate(CANDIDATES, AUTO.model_copy(update={"candidates": []}))
    assert not verdict["passed"] and "candidates is empty" in verdict["failed"][0]


@pytest.mark.parametrize(
    "broken, reason",
    [
        (
            {"release": {"top1": 150.0, "p50_ms": 0.4, "size_mb": 1.0}},
            "release.top1 is 150, outside [0, 100]",
        ),
        (
            {"teacher": {"top1": -50.0, "p50_ms": 8.0, "size_mb": 44.0}},
            "teacher.top1 is -50, outside [0, 100]",
        ),
        (
            {"release": {"top1": 1e308, "p50_ms": 0.4, "size_mb": 1.0}},
            "release.top1 is 1e+308, outside",
        ),
        (
            {
                "release": {"top1": 97.5, "p50_ms": 1e-308, "size_mb": 1.0},
                "teacher": {"top1": 98.0, "p50_ms": 1e308, "size_mb": 44.0},
            },
            "teacher.p50_ms is 1e+308, outside",
        ),
        (
            {"release": {"top1": 97.5, "p50_ms": 0.4, "size_mb": 1e-300}},
            "release.size_mb is 1e-300, outside",
        ),
    ],
    ids=["top1-150", "top1-minus-50", "top1-1e308", "p50-1e-308-vs-1e308", "size-1e-300"],
)
def test_fails_closed_on_metrics_no_measurement_can_have(broken, reason):
    # each of these passed before: the drop of a 150 % release is "negative", 1e308 / 1e-308 = inf
    verdict = evaluate_gate({**GOOD, **broken}, GATE)
    assert not verdict["passed"]
    assert any(reason in f for f in verdict["failed"]), verdict["failed"]
    assert all(c["measured"] is not None for c in verdict["checks"] if c["passed"])


def test_evidence_problems_fail_the_release_and_the_reference_fails_every_candidate():
    from resnet_slim.gate.checks import Evidence

    clean = Evidence(problems=[], model_problems={"teacher": [], "fast": [], "slow": []})
    assert evaluate_gate(CANDIDATES, AUTO, clean)["release"] == "fast"
    # a candidate whose file changed is not chosen; the next fastest passing one is
    stale_fast = Evidence(problems=[], model_problems={"fast": ["fast: models/fast.onnx changed"]})
    verdict = evaluate_gate(CANDIDATES, AUTO, stale_fast)
    assert verdict["passed"] and verdict["release"] == "slow"
    evidence = next(c for c in verdict["checks"] if c["name"] == "evidence")
    assert evidence["passed"] and evidence["measured"] == 0
    # the reference's problems (or the record's) fail everyone
    stale_teacher = Evidence(
        problems=[], model_problems={"teacher": ["teacher: models/teacher.onnx is missing"]}
    )
    verdict = evaluate_gate(CANDIDATES, AUTO, stale_teacher)
    assert not verdict["passed"]
    assert all(
        "evidence: teacher: models/teacher.onnx is missing" in " ".join(c["failed"])
        for c in verdict["selection"]["candidates"]
    )
    torn = evaluate_gate(GOOD, GATE, Evidence(problems=["predictions.csv is not the one recorded"]))
    assert torn["failed"] == ["evidence: predictions.csv is not the one recorded"]


def test_gate_names_where_the_reference_came_from():
    from resnet_slim.gate.gate import reference_origin

    origin = {
        "file": "models/imported/r56.th",
        "format": "cifar_resnet",
        "family": "cifar_resnet56",
        "sha256": "ab" * 32,
        "tracked_by_dvc": True,
        "top1_as_imported": {"test": 83.2},
        "top1_after_adaptation": None,
        "head_replaced": False,
    }
    named = reference_origin({"val_top1": 90.0, "origin": origin})
    assert named["file"] == "models/imported/r56.th" and named["sha256"] == "ab" * 32
    assert named["top1_as_imported"] == {"test": 83.2} and "head_replaced" not in named
    assert reference_origin({"val_top1": 98.0}) == {"trained_here": True}
    assert reference_origin(None) == {"trained_here": True}


# --------------------------------------------------------------------------------------------
# the gate stage fails closed on benchmark results it cannot use (stage runs: test_stages.py)


@pytest.mark.parametrize(
    "bench, code, reason",
    [
        (
            {"models": {**GOOD_BENCH, "rel": {"top1": "97.9", "p50_ms": 1.0, "size_mb": 1.0}}},
            1,
            "metric rel.top1 is missing or not a number ('97.9')",
        ),
        (
            {"models": {**GOOD_BENCH, "rel": {"top1": math.inf, "p50_ms": 1.0, "size_mb": 1.0}}},
            1,
            "metric rel.top1 is inf",
        ),
        ({"models": GOOD_BENCH}, 1, "no benchmark results for model 'rel'"),
        (
            {"models": {**GOOD_BENCH, "rel": {"top1": 98.0, "p50_ms": 0.0, "size_mb": 1.0}}},
            1,
            "metric rel.p50_ms is 0.0, must be > 0",
        ),
        ([GOOD_BENCH], 1, "no benchmark results for model 'teacher'"),
        ("{not json", 2, "benchmark results is not valid JSON"),
    ],
    ids=["string", "inf", "release-absent", "zero-latency", "not-a-mapping", "malformed"],
)
def test_gate_fails_closed(tmp_path, bench, code, reason):
    (tmp_path / "bench.json").write_text(bench if isinstance(bench, str) else json.dumps(bench))
    params = tiny_params(tmp_path / "params.yaml", gate={"release": "rel"})
    args = [
        "--params",
        str(params),
        "--benchmark",
        str(tmp_path / "bench.json"),
        *absent_gate_inputs(tmp_path),
        "--out",
        str(tmp_path / "gate.json"),
    ]
    if code == 1:
        assert stage_main("gate")(args) == 1
    else:
        with pytest.raises(UserError, match=reason):
            stage_main("gate")(args)
    verdict = json.loads((tmp_path / "gate.json").read_text())
    assert verdict["passed"] is False and any(reason in f for f in verdict["failed"]), verdict
