"""How sure is a top-1 number? Bootstrap CIs, the paired difference of two models, McNemar's test.

A 1 pp gate sits close to the noise: a 1,000-image test split has about ±1.4 pp of sampling error
on accuracy alone. Two models scored on the *same* images share most of that error, so their
difference is resampled per image (paired bootstrap), which gives a much narrower interval than two
independent CIs. McNemar's exact test asks whether the images only one model gets right split
unevenly enough to be more than chance.

All inputs are per-image correctness vectors (bool, one entry per test image, same order).
"""

import math

import numpy as np


def _as_correct(correct, what: str = "correct") -> np.ndarray:
    array = np.asarray(correct, dtype=bool)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what}: need a non-empty 1-D vector of per-image correctness")
    return array


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """resamples x n image indices drawn with replacement; one seed -> the same draws every run."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_accuracy_ci(
    correct, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Top-1 (%) and its percentile-bootstrap CI over test images."""
    correct = _as_correct(correct)
    idx = _resample_indices(len(correct), resamples, seed)
    samples = 100.0 * correct[idx].mean(axis=1)
    low, high = _percentile_ci(samples, level)
    return {
        "top1": 100.0 * float(correct.mean()),
        "ci_low": low,
        "ci_high": high,
        "level": level,
        "resamples": resamples,
        "n": int(len(correct)),
    }


def correct_from_counts(n_correct: int, n: int) -> np.ndarray:
    """A correctness vector with these counts: enough for one model's bootstrap (not for pairs)."""
    return np.arange(n) < n_correct


def mcnemar_exact(ref_correct, rel_correct) -> dict:
    """Exact (binomial) two-sided McNemar test on the discordant images.

    b: the reference right and the release wrong; c: the other way round. Under "no difference"
    each discordant image is a fair coin, so p = P(Binomial(b + c, 1/2) as extreme as observed).
    """
    ref, rel = _as_correct(ref_correct, "reference"), _as_correct(rel_correct, "release")
    if ref.shape != rel.shape:
        raise ValueError(f"paired vectors differ in length: {len(ref)} vs {len(rel)} images")
    b, c = int((ref & ~rel).sum()), int((~ref & rel).sum())
    n = b + c
    # exact integers: 2.0**n overflows a float past n = 1023 discordant images (a weak model
    # on 8,000 test images has more); int / int is correctly rounded at any size
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n if n else 1.0
    return {"ref_only_correct": b, "release_only_correct": c, "p_value": min(1.0, 2.0 * tail)}


def paired_drop(
    ref_correct, rel_correct, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Top-1 drop (reference − release, pp) on the same images, its paired-bootstrap CI, McNemar."""
    ref, rel = _as_correct(ref_correct, "reference"), _as_correct(rel_correct, "release")
    if ref.shape != rel.shape:
        raise ValueError(f"paired vectors differ in length: {len(ref)} vs {len(rel)} images")
    per_image = ref.astype(np.float64) - rel.astype(np.float64)  # +1: only the reference was right
    idx = _resample_indices(len(ref), resamples, seed)
    low, high = _percentile_ci(100.0 * per_image[idx].mean(axis=1), level)
    return {
        "drop_pp": 100.0 * float(per_image.mean()),
        "ci_low": low,
        "ci_high": high,
        "level": level,
        "resamples": resamples,
        "n": int(len(ref)),
        "mcnemar": mcnemar_exact(ref, rel),
    }


def images_needed(n: int, ci_width_pp: float, target_width_pp: float) -> int:
    """Test images for a CI of `target_width_pp` at the same accuracies (width ~ 1/sqrt(n))."""
    return int(math.ceil(n * (ci_width_pp / target_width_pp) ** 2))


def across_seeds(values, *, level: float = 0.95) -> dict:
    """Mean, sample std and Student-t CI of the mean of per-seed values (e.g. per-seed drops)."""
    values = np.asarray(values, dtype=np.float64)
    k = len(values)
    mean = float(values.mean()) if k else math.nan
    if k < 2:
        return {
            "mean": mean,
            "std": None,
            "ci_low": None,
            "ci_high": None,
            "n_seeds": k,
            "level": level,
        }
    from scipy.stats import t  # scipy comes with scikit-learn

    std = float(values.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2.0, df=k - 1)) * std / math.sqrt(k)
    return {
        "mean": mean,
        "std": std,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "n_seeds": k,
        "level": level,
    }


def ratio_of_rounds(
    numerator_ms, denominator_ms, *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """How many times faster the denominator's model is: the median over rounds of the per-round
    ratio (numerator / denominator, each a round's median ms), with a percentile-bootstrap CI over
    rounds. Both models were timed in the same rounds (timing.time_in_rounds), so a load spike
    that slowed a round slowed both and cancels in that round's ratio."""
    a = np.asarray(numerator_ms, dtype=np.float64)
    b = np.asarray(denominator_ms, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(
            f"need the same 2+ rounds for both models (got {a.shape} and {b.shape} round times)"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all() and (a > 0).all() and (b > 0).all()):
        raise ValueError("round times must be finite and > 0 ms")
    ratios = a / b
    idx = _resample_indices(len(ratios), resamples, seed)
    low, high = _percentile_ci(np.median(ratios[idx], axis=1), level)
    return {
        "ratio": float(np.median(ratios)),
        "ci_low": low,
        "ci_high": high,
        "level": level,
        "rounds": int(len(ratios)),
    }


def accuracy_with_ci(predictions, labels, p) -> dict:
    """A benchmark row's top-1 keys: top-1 and its bootstrap CI over test images, at the benchmark
    section's `ci_level` / `bootstrap_resamples` / `bootstrap_seed` (fixed: reruns agree)."""
    ci = bootstrap_accuracy_ci(
        np.asarray(predictions) == np.asarray(labels),
        level=p.ci_level,
        resamples=p.bootstrap_resamples,
        seed=p.bootstrap_seed,
    )
    return {
        "top1": ci["top1"],
        "top1_ci_low": ci["ci_low"],
        "top1_ci_high": ci["ci_high"],
        "ci_level": p.ci_level,
    }
