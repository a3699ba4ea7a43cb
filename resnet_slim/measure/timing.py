"""Latency timing: one loop for a single call, and models timed side by side in rounds.

On a shared 2-core host a load spike that lands on one model's turn skews a ratio of two medians
taken one after the other (the same files gave 17.6x in one run and 32.3x in the next). So the
benchmark times every model in rounds, in a shuffled order each round (fixed seed), with every
session kept open: a spike then lands on all models of a round alike, and a ratio formed round by
round (stats.ratio_of_rounds) cancels it, as timing against a co-resident control does.
google/benchmark's random interleaving of repetitions is the same idea.
"""

import time
from collections.abc import Callable

import numpy as np

SLOW_ROUND = 1.2  # a round whose median is > 20 % over the model's overall median is "slow"


def time_ms(call: Callable[[], object], *, warmup: int, runs: int) -> np.ndarray:
    """Milliseconds of each of `runs` calls, after `warmup` calls that are discarded: every
    latency here (onnxruntime, PyTorch, the roofline's conv chains) is timed by this loop."""
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    return times * 1000.0


def percentiles_ms(times: np.ndarray) -> dict:
    times = np.asarray(times).ravel()
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p90_ms": float(np.percentile(times, 90)),
        "p99_ms": float(np.percentile(times, 99)),
        "mean_ms": float(times.mean()),
    }


def round_orders(names: list[str], *, rounds: int, seed: int) -> list[list[str]]:
    """The order models are timed in, per round: a fresh shuffle each round, the same every run."""
    rng = np.random.default_rng(seed)
    return [[names[i] for i in rng.permutation(len(names))] for _ in range(rounds)]


def time_in_rounds(
    calls: dict[str, Callable[[], object]],
    *,
    rounds: int,
    runs_per_round: int,
    warmup: int,
    round_warmup: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """({model: ms array of shape (rounds, runs_per_round)}, the order of each round).

    Each model is warmed up `warmup` calls before the first round, and `round_warmup` untimed
    calls at each of its turns (switching models evicts the caches; the steady state is what the
    single-model loop measured, so the numbers stay comparable with it).
    """
    for call in calls.values():
        time_ms(call, warmup=warmup, runs=0)
    orders = round_orders(list(calls), rounds=rounds, seed=seed)
    times = {name: np.empty((rounds, runs_per_round)) for name in calls}
    for r, order in enumerate(orders):
        for name in order:
            times[name][r] = time_ms(calls[name], warmup=round_warmup, runs=runs_per_round)
    return times, orders


def round_medians(times: np.ndarray) -> np.ndarray:
    """One number per round: the median of that round's runs."""
    return np.median(np.asarray(times, dtype=np.float64), axis=1)


def noise(times: np.ndarray) -> dict:
    """The spread one model saw: coefficient of variation of its per-round medians, and the
    fraction of rounds whose median was more than 20 % over its overall median."""
    medians = round_medians(times)
    overall = float(np.median(times))
    return {
        "round_cv": float(medians.std(ddof=1) / medians.mean()) if len(medians) > 1 else 0.0,
        "slow_round_fraction": float((medians > SLOW_ROUND * overall).mean()),
    }


def rounds_summary(times: np.ndarray) -> dict:
    """A benchmark row's latency keys from its rounds: percentiles over every timed run, the
    per-round medians (the ratios are formed from these) and the noise."""
    return {
        **percentiles_ms(times),
        "round_p50_ms": [round(float(m), 6) for m in round_medians(times)],
        **noise(times),
    }


def latency_ms(session, image: np.ndarray, *, warmup: int, runs: int) -> dict:
    """Batch-1 latency percentiles of one onnxruntime (or session-like) model, timed alone."""
    feed = {session.get_inputs()[0].name: image}
    return percentiles_ms(time_ms(lambda: session.run(None, feed), warmup=warmup, runs=runs))


def round_medians_ms(
    calls: dict, *, warmup: int, runs: int, repeats: int, round_warmup: int, seed: int
) -> dict:
    """{name: the median of each round} for calls timed side by side in shuffled rounds."""
    times, _ = time_in_rounds(
        calls,
        rounds=repeats,
        runs_per_round=runs,
        warmup=warmup,
        round_warmup=round_warmup,
        seed=seed,
    )
    return {name: round_medians(values) for name, values in times.items()}
