"""Speed-ups you can trust: the benchmark stage run several times on the same ONNX files, on a quiet
host and with a second process busy on one core; each run's release-vs-reference speed-up with its
95% CI (the median of per-round ratios, as the gate judges it).

    python -m benchmarks.speedup_stability             # the default run's files (after dvc repro)
    python -m benchmarks.speedup_stability --workspace DIR --params DIR/params.yaml \\
        --release pruned_qat_int8 --out benchmarks/speedup_stability_resnet56.json

Each run is `python -m stages.benchmark` (the stage's own command from dvc.yaml, writing to a
scratch folder) in --workspace. For contrast, each run also times the reference and the release
the way the benchmark did before this change, each alone, one after the other (warm-up, then
rounds x runs_per_round consecutive runs), and reports the ratio of those two p50s.

Goals (issue "speed-ups you can trust"): the quiet runs' ratios within ±10 % of their mean; the
loaded runs' within ±15 % of the quiet mean, and each loaded run's CI contains the quiet runs'
median. Results go to --out as JSON and to stdout as a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from any folder: the stages import this checkout's library

from resnet_slim.compress.export import make_session  # noqa: E402
from resnet_slim.gate.metrics import best_peer_int8, speedup  # noqa: E402
from resnet_slim.hardware import hardware_fingerprint  # noqa: E402
from resnet_slim.measure.timing import latency_ms  # noqa: E402
from resnet_slim.params import load_params  # noqa: E402

BUSY_LOOP = "while True:\n    pass\n"


def stage_command(workspace: Path, params: Path, scratch: Path) -> list[str]:
    """dvc.yaml's benchmark command, its outputs moved to `scratch` (inputs that exist only)."""
    command = [
        sys.executable,
        "-m",
        "stages.benchmark",
        "--params",
        str(params),
        "--models-dir",
        "models",
        "--data",
        "data/prepared",
        "--out",
        str(scratch / "benchmark.json"),
        "--table",
        str(scratch / "benchmark.csv"),
        "--predictions",
        str(scratch / "predictions.csv"),
    ]
    torch_results = sorted(str(p) for p in (workspace / "reports" / "torch_ptq").glob("*.json"))
    if torch_results:
        command += ["--torch-results", *torch_results]
    if (workspace / "reports" / "targets.json").is_file():
        command += [
            "--targets",
            "reports/targets.json",
            "--targets-predictions",
            "reports/targets_predictions.csv",
        ]
    return command


def timed_alone(workspace: Path, names: list[str], p, image: np.ndarray) -> dict[str, float]:
    """The previous benchmark's method: each model alone, one after the other -> p50 ms."""
    result = {}
    for name in names:
        session = make_session(workspace / "models" / f"{name}.onnx", threads=p.threads)
        result[name] = latency_ms(session, image, warmup=p.warmup, runs=p.timed_runs)["p50_ms"]
    return result


def one_run(workspace: Path, params_path: Path, release: str, *, loaded: bool) -> dict:
    params = load_params(params_path)
    reference = params.gate.reference
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if loaded else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            done = subprocess.run(
                stage_command(workspace, params_path, Path(tmp)),
                cwd=workspace,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"error: the benchmark stage failed: {done.stderr[-2000:]}")
            models = json.loads((Path(tmp) / "benchmark.json").read_text())["models"]
        image = np.zeros((1, 3, *_input_size(workspace, reference)), np.float32)
        alone = timed_alone(workspace, [reference, release], params.benchmark, image)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    peer = best_peer_int8(models, reference)
    vs_ref = speedup(models, reference, release, params.benchmark)
    vs_peer = speedup(models, peer, release, params.benchmark) if peer else None
    return {
        "condition": "one core busy" if loaded else "quiet",
        "stage_wall_s": round(wall, 1),
        "speedup": vs_ref["ratio"],
        "speedup_ci": vs_ref["ci"],
        "best_peer_int8": peer,
        "speedup_vs_peer": vs_peer and vs_peer["ratio"],
        "speedup_vs_peer_ci": vs_peer and vs_peer["ci"],
        "release_p50_ms": round(models[release]["p50_ms"], 4),
        "reference_p50_ms": round(models[reference]["p50_ms"], 4),
        "release_round_cv": round(models[release]["round_cv"], 4),
        "reference_round_cv": round(models[reference]["round_cv"], 4),
        "timed_alone_speedup": round(alone[reference] / alone[release], 4),
    }


def _input_size(workspace: Path, name: str) -> tuple[int, int]:
    shape = make_session(workspace / "models" / f"{name}.onnx").get_inputs()[0].shape
    return int(shape[2]), int(shape[3])


def spread(values: list[float], centre: float) -> float:
    """Largest deviation from `centre`, as a fraction of it."""
    return max(abs(v - centre) for v in values) / centre


def summarise(runs: list[dict]) -> dict:
    quiet = [r for r in runs if r["condition"] == "quiet"]
    loaded = [r for r in runs if r["condition"] != "quiet"]
    q = [r["speedup"] for r in quiet]
    mean, median = float(np.mean(q)), float(np.median(q))
    alone = [r["timed_alone_speedup"] for r in quiet]
    summary = {
        "quiet_mean": round(mean, 4),
        "quiet_median": round(median, 4),
        "quiet_max_deviation": round(spread(q, mean), 4),
        "timed_alone_quiet_max_deviation": round(spread(alone, float(np.mean(alone))), 4),
    }
    if loaded:
        summary["loaded_max_deviation_from_quiet_mean"] = round(
            spread([r["speedup"] for r in loaded], mean), 4
        )
        summary["loaded_cis_contain_quiet_median"] = all(
            r["speedup_ci"] and r["speedup_ci"][0] <= median <= r["speedup_ci"][1] for r in loaded
        )
        summary["timed_alone_loaded_max_deviation"] = round(
            spread([r["timed_alone_speedup"] for r in loaded], float(np.mean(alone))), 4
        )
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=REPO, help="holds models/, data/")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--release",
        help="the model compared with gate.reference "
        "(default: the release in the workspace's reports/gate.json)",
    )
    parser.add_argument("--quiet-runs", type=int, default=3)
    parser.add_argument("--loaded-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "speedup_stability.json")
    args = parser.parse_args(argv)
    workspace, params = args.workspace.resolve(), args.params.resolve()
    release = (
        args.release or json.loads((workspace / "reports" / "gate.json").read_text())["release"]
    )
    runs = []
    for loaded in [False] * args.quiet_runs + [True] * args.loaded_runs:
        runs.append(one_run(workspace, params, release, loaded=loaded))
        r = runs[-1]
        print(
            f"{r['condition']:14s} {r['speedup']:.2f}x [{r['speedup_ci'][0]:.2f}, "
            f"{r['speedup_ci'][1]:.2f}]  timed alone {r['timed_alone_speedup']:.2f}x  "
            f"stage {r['stage_wall_s']:.0f} s",
            flush=True,
        )
    result = {
        "command": " ".join(["python -m benchmarks.speedup_stability", *(argv or sys.argv[1:])]),
        "hardware": hardware_fingerprint(),
        "workspace": str(workspace),
        "release": release,
        "reference": load_params(params).gate.reference,
        "benchmark": yaml.safe_load(params.read_text()).get("benchmark"),
        "runs": runs,
        "summary": summarise(runs),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| run | speed-up | 95% CI | vs best peer INT8 | timed alone (before) | stage s |\n"
        "|---|---|---|---|---|---|"
    )
    for r in runs:
        peer = (
            f"{r['speedup_vs_peer']:.2f}x [{r['speedup_vs_peer_ci'][0]:.2f}, "
            f"{r['speedup_vs_peer_ci'][1]:.2f}]"
            if r["speedup_vs_peer_ci"]
            else "–"
        )
        print(
            f"| {r['condition']} | {r['speedup']:.2f}x | [{r['speedup_ci'][0]:.2f}, "
            f"{r['speedup_ci'][1]:.2f}] | {peer} | {r['timed_alone_speedup']:.2f}x | "
            f"{r['stage_wall_s']:.0f} |"
        )
    print(f"\nsummary: {json.dumps(result['summary'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
