"""seed_repeats: re-train the teacher and the release candidates once per extra seed in
`base.seeds` (same data split), score each on the test split, write mean ± std per model and the
per-seed drops the gate uses. With `base.seeds: []` it only records the main run (instant)."""

import argparse
import time
from pathlib import Path


from resnet_slim import seeds as repeats
from resnet_slim.bench import top1
from resnet_slim.data import normalized_split
from resnet_slim.errors import UserError, run_stage
from resnet_slim.export import make_session
from resnet_slim.io import read_json, write_json
from resnet_slim.params import load_params, read_yaml
from resnet_slim.stats import across_seeds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pipeline", default="dvc.yaml", help="where the stage commands come from")
    parser.add_argument("--benchmark", default="reports/benchmark.json")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--keep", nargs="*", default=["prepare", "validate_data"],
                        help="stages whose outputs every seed shares (the data split)")
    parser.add_argument("--out", default="reports/seeds.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    g, base = params.gate, params.base

    bench = read_json(args.benchmark, what="benchmark results")
    models = (bench.get("models") if isinstance(bench, dict) else None) or {}
    names = [g.reference] + (list(g.candidates) if g.release == "auto" else [g.release])
    missing = [n for n in names if not isinstance(models.get(n), dict) or "file" not in models[n]]
    if missing:
        raise UserError(f"{args.benchmark}: no benchmark rows for {missing} (gate.reference / "
                        f"candidates); seed repeats need the same models")
    files = {n: models[n]["file"] for n in names}
    runs = [{"seed": base.seed, "top1": {n: models[n].get("top1") for n in names}, "source": "main run"}]
    extra = [s for s in base.seeds if s != base.seed]
    order: list[str] = []
    if extra:
        stages = repeats.read_stages(args.pipeline)
        keep = set(args.keep)
        order = repeats.stages_to_rerun(stages, list(files.values()), keep)
        print(f"seed_repeats: seeds {extra} re-run {len(order)} stages each: {', '.join(order)}")
        raw = read_yaml(Path(args.params))
        # the no-teacher comparison student is a report extra, not a candidate: skip it in repeats
        raw["distill"] = {**(raw.get("distill") or {}), "train_baseline": False}
        images, labels = normalized_split(args.data, "test")
        repo = Path.cwd()
        for seed in extra:
            start, scratch = time.perf_counter(), repeats.scratch_dir(repo)
            try:
                repeats.run_seed(seed, repo=repo, params=raw, stages=stages, order=order, keep=keep,
                                 scratch=scratch, log=lambda line: print(f"seed_repeats: {line}", flush=True))
                scores = {n: top1(make_session(scratch / files[n]), images, labels) for n in names}
            finally:
                repeats.remove(scratch)
            runs.append({"seed": seed, "top1": scores, "minutes": (time.perf_counter() - start) / 60})
            print(f"seed_repeats: seed {seed}: " + ", ".join(f"{n} {v:.2f}%" for n, v in scores.items()))

    def across(values):
        return across_seeds(values, level=params.benchmark.ci_level)

    result = {
        "seeds": [r["seed"] for r in runs], "repeats": bool(extra), "models": names,
        "rerun_stages": order, "runs": runs,
        # what the main run measured: the gate uses these repeats only for the same files and split
        "benchmark_models": {n: {k: models[n].get(k) for k in ("file", "sha256")} for n in names},
        "test_split": bench.get("test_split"),
        "top1": {n: across([r["top1"][n] for r in runs]) for n in names},
        "drop_pp": {n: across([r["top1"][g.reference] - r["top1"][n] for r in runs])
                    for n in names if n != g.reference}}
    write_json(args.out, result)
    for n, s in result["top1"].items():
        spread = f" ± {s['std']:.2f}" if s["std"] is not None else ""
        print(f"seed_repeats: {n:24s} top-1 {s['mean']:.2f}%{spread} over {s['n_seeds']} seed(s)")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
