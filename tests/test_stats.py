"""Confidence intervals, the paired drop and McNemar against hand-computed cases; the upper_ci
gate."""

import math

import numpy as np
import pytest

from resnet_slim import stats
from resnet_slim.gate.checks import Evidence
from resnet_slim.gate.gate import evaluate_gate
from resnet_slim.gate.metrics import headline_metrics
from resnet_slim.params import GateParams


def test_bootstrap_ci_of_two_images_one_right_is_zero_to_hundred():
    # resampled means are 0, 50, 100 with probabilities 1/4, 1/2, 1/4: the 95% CI is [0, 100]
    ci = stats.bootstrap_accuracy_ci([True, False], resamples=4000, seed=0)
    assert ci["top1"] == 50.0 and (ci["ci_low"], ci["ci_high"]) == (0.0, 100.0)


def test_bootstrap_ci_of_a_perfect_model_has_no_width():
    ci = stats.bootstrap_accuracy_ci(np.ones(50, bool))
    assert (ci["top1"], ci["ci_low"], ci["ci_high"]) == (100.0, 100.0, 100.0)


def test_bootstrap_ci_matches_the_normal_approximation_on_a_large_split():
    # 900 of 1,000 right: 90% ± 1.96 * sqrt(0.9 * 0.1 / 1000) = ± 1.86 pp
    ci = stats.bootstrap_accuracy_ci(stats.correct_from_counts(900, 1000), resamples=4000, seed=1)
    assert ci["ci_low"] == pytest.approx(90 - 1.86, abs=0.3)
    assert ci["ci_high"] == pytest.approx(90 + 1.86, abs=0.3)


def test_bootstrap_is_reproducible_with_a_fixed_seed():
    correct = np.random.default_rng(3).random(300) < 0.8
    assert stats.bootstrap_accuracy_ci(correct, seed=7) == stats.bootstrap_accuracy_ci(
        correct, seed=7
    )


def test_paired_drop_point_and_interval_by_hand():
    ref = [True, True, True, False]
    rel = [True, False, False, False]
    paired = stats.paired_drop(ref, rel, resamples=4000, seed=0)
    assert paired["drop_pp"] == 50.0  # 75% -> 25%
    # per-image differences (0, 1, 1, 0): resampled means lie in [0, 100]
    assert 0.0 <= paired["ci_low"] <= 25.0 and 75.0 <= paired["ci_high"] <= 100.0
    assert (
        paired["mcnemar"]["ref_only_correct"] == 2
        and paired["mcnemar"]["release_only_correct"] == 0
    )


def test_identical_models_have_a_zero_width_paired_ci_and_mcnemar_p_of_one():
    correct = np.random.default_rng(0).random(200) < 0.9
    paired = stats.paired_drop(correct, correct)
    assert (paired["drop_pp"], paired["ci_low"], paired["ci_high"]) == (0.0, 0.0, 0.0)
    assert paired["mcnemar"]["p_value"] == 1.0


def test_pairing_is_narrower_than_two_independent_intervals():
    rng = np.random.default_rng(0)
    ref = rng.random(1000) < 0.9
    rel = ref.copy()
    flip = rng.choice(1000, 20, replace=False)  # the models disagree on 20 images only
    rel[flip] = ~rel[flip]
    paired = stats.paired_drop(ref, rel)
    one = stats.bootstrap_accuracy_ci(ref)
    assert paired["ci_high"] - paired["ci_low"] < (one["ci_high"] - one["ci_low"]) / 2


@pytest.mark.parametrize(
    "b, c, p",
    [
        (1, 9, 22 / 1024),  # 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 0.021484375 (statsmodels exact)
        (0, 6, 2 / 64),  # 0.03125
        (5, 5, 1.0),  # balanced disagreements: capped at 1
        (0, 0, 1.0),  # no disagreements at all
        (3, 12, 2 * (1 + 15 + 105 + 455) / 2**15),  # 0.03515625
    ],
)
def test_mcnemar_exact_matches_the_binomial_table(b, c, p):
    ref = [True] * b + [False] * c + [True] * 7
    rel = [False] * b + [True] * c + [True] * 7
    result = stats.mcnemar_exact(ref, rel)
    assert (result["ref_only_correct"], result["release_only_correct"]) == (b, c)
    assert result["p_value"] == pytest.approx(p)


def test_mcnemar_exact_past_1023_discordant_images():
    # a weak model on 8,000 test images: 2.0**n overflowed a float here
    balanced = stats.mcnemar_exact([True] * 600 + [False] * 600, [False] * 600 + [True] * 600)
    assert balanced["p_value"] == 1.0
    b, c = 500, 700
    result = stats.mcnemar_exact([True] * b + [False] * c, [False] * b + [True] * c)
    z = (abs(b - c) - 1) / math.sqrt(b + c)  # the continuity-corrected normal approximation
    assert result["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.1)
    assert 0.0 < result["p_value"] < 1e-8


def test_across_seeds_mean_std_and_t_interval():
    s = stats.across_seeds([0.2, 0.4, 0.3])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(0.1)
    half = 4.302652729749464 * 0.1 / np.sqrt(3)  # t(0.975, df=2)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.3 - half, 0.3 + half))
    assert stats.across_seeds([0.5])["std"] is None


def test_images_needed_scales_with_the_square_of_the_width():
    assert stats.images_needed(270, ci_width_pp=3.0, target_width_pp=1.0) == 2430


def test_mismatched_pairs_are_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_drop([True, False], [True])


# The gate on the upper end of the CI -------------------------------------------------------

GATE = GateParams(
    release="release",
    reference="teacher",
    max_acc_drop_pp=1.0,
    min_speedup=2.0,
    max_size_ratio=0.5,
    acc_drop_statistic="upper_ci",
)


def _noisy_pair(n=200, ref_only=11, release_only=10):
    """Point drop (ref_only - release_only) / n: here 0.5 pp, but 21 disagreements of 200 images."""
    ref = np.zeros(n, bool)
    rel = np.zeros(n, bool)
    ref[:150], rel[:150] = True, True
    ref[150 : 150 + ref_only] = True
    rel[150 + ref_only : 150 + ref_only + release_only] = True
    return ref, rel


def _results(ref, rel):
    return {
        "teacher": {"top1": 100 * ref.mean(), "p50_ms": 8.0, "size_mb": 40.0},
        "release": {"top1": 100 * rel.mean(), "p50_ms": 1.0, "size_mb": 1.0},
    }


def test_upper_ci_fails_a_release_whose_point_drop_passes_but_whose_ci_crosses_the_threshold():
    ref, rel = _noisy_pair()
    evidence = Evidence(correct={"teacher": ref, "release": rel})
    point = evaluate_gate(
        _results(ref, rel), GATE.model_copy(update={"acc_drop_statistic": "point"}), evidence
    )
    assert point["passed"]
    verdict = evaluate_gate(_results(ref, rel), GATE, evidence)
    check = verdict["checks"][0]
    assert not verdict["passed"] and check["name"] == "accuracy_drop_pp"
    assert check["point"] == pytest.approx(0.5) and check["measured"] == check["ci"][1] > 1.0
    assert check["decidable"] is False and check["images_needed"] > 200
    assert 0.5 < check["mcnemar_p"] <= 1.0


def test_upper_ci_passes_when_the_whole_interval_is_inside_the_threshold():
    ref, rel = _noisy_pair(n=2000, ref_only=2, release_only=2)
    verdict = evaluate_gate(
        _results(ref, rel), GATE, Evidence(correct={"teacher": ref, "release": rel})
    )
    assert verdict["passed"], verdict["failed"]


def test_upper_ci_without_per_image_predictions_fails_closed():
    ref, rel = _noisy_pair()
    verdict = evaluate_gate(_results(ref, rel), GATE, Evidence(correct={"teacher": ref}))
    assert not verdict["passed"]
    assert "no per-image predictions for ['release']" in verdict["failed"][0]


def test_seed_repeats_gate_on_the_mean_drop_and_its_interval_across_seeds():
    ref, rel = _noisy_pair()
    steady = {
        "runs": [
            {"seed": s, "top1": {"teacher": 90.0, "release": 90.0 - d}}
            for s, d in ((0, 0.2), (1, 0.4), (2, 0.3))
        ]
    }
    verdict = evaluate_gate(_results(ref, rel), GATE, Evidence(correct={}, seeds=steady))
    check = verdict["checks"][0]
    assert verdict["passed"] and check["basis"] == "seeds" and check["point"] == pytest.approx(0.3)
    shaky = {
        "runs": [
            {"seed": s, "top1": {"teacher": 90.0, "release": 90.0 - d}}
            for s, d in ((0, 0.0), (1, 1.5), (2, 0.3))
        ]
    }
    verdict = evaluate_gate(_results(ref, rel), GATE, Evidence(correct={}, seeds=shaky))
    assert not verdict["passed"] and verdict["checks"][0]["point"] == pytest.approx(0.6)


def test_a_wide_interval_entirely_below_the_threshold_still_decides():
    # 270 images, the release right on 5 images the teacher misses: CI about [-3.7, 0] pp
    ref, rel = _noisy_pair(n=270, ref_only=0, release_only=5)
    verdict = evaluate_gate(
        _results(ref, rel), GATE, Evidence(correct={"teacher": ref, "release": rel})
    )
    check = verdict["checks"][0]
    assert verdict["passed"] and check["ci_width_pp"] > 1.0
    assert check["decidable"] is True and "images_needed" not in check


def test_a_tiny_mcnemar_p_is_kept_in_the_headline_metrics():
    # 60 images only the teacher got right, none the other way: p ~ 1.7e-18, not "0.0"
    ref, rel = _noisy_pair(n=2000, ref_only=60, release_only=0)
    verdict = evaluate_gate(
        _results(ref, rel), GATE, Evidence(correct={"teacher": ref, "release": rel})
    )
    headline = headline_metrics(verdict, _results(ref, rel))
    assert 0.0 < headline["mcnemar_p"] < 1e-10
    assert headline["mcnemar_p"] == float(f"{verdict['checks'][0]['mcnemar_p']:.3g}")
