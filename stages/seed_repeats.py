"""seed_repeats: re-train the teacher and the release candidates once per extra seed in
`base.seeds` (same data split), score each on the test split, write mean ± std per model and the
per-seed drops the gate uses. With `base.seeds: []` it only records the main run (instant)."""

import argparse
from pathlib import Path

from resnet_slim.errors import run_stage


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pipeline", default="dvc.yaml", help="where the stage commands come from")
    parser.add_argument("--benchmark", required=True, help="the main run's benchmark results")
    parser.add_argument("--data", required=True, help="prepared dataset (its test split)")
    parser.add_argument(
        "--keep",
        nargs="*",
        default=["prepare", "validate_data"],
        help="stages whose outputs every seed shares (the data split)",
    )
    parser.add_argument("--out", required=True, help="seed repeats (JSON)")
    args = parser.parse_args(argv)
    # after parse_args: `--help` needs no torch or onnxruntime
    from resnet_slim.compress.export import make_session
    from resnet_slim.data.loader import normalized_split
    from resnet_slim.gate import seeds as repeats
    from resnet_slim.gate.gate import judged_models
    from resnet_slim.io import read_json, write_json
    from resnet_slim.measure.bench import top1
    from resnet_slim.params import load_params, read_yaml

    params = load_params(args.params)
    bench = read_json(args.benchmark, what="benchmark results")
    names = judged_models(params.gate)
    files = repeats.model_files(bench, names, source=args.benchmark)
    extra = [s for s in params.base.seeds if s != params.base.seed]
    order, runs = [], []
    if extra:
        stages = repeats.read_stages(args.pipeline)
        order = repeats.stages_to_rerun(stages, list(files.values()), set(args.keep))
        print(f"seed_repeats: seeds {extra} re-run {len(order)} stages each: {', '.join(order)}")
        raw = read_yaml(Path(args.params))
        # the no-teacher comparison student is a report extra, not a candidate: skip it in repeats
        raw["distill"] = {**(raw.get("distill") or {}), "train_baseline": False}
        images, labels = normalized_split(args.data, "test")
        runs = repeats.repeat_runs(
            extra,
            repo=Path.cwd(),
            params=raw,
            stages=stages,
            order=order,
            keep=set(args.keep),
            score=lambda scratch: {
                n: top1(make_session(scratch / f), images, labels) for n, f in files.items()
            },
            log=lambda line: print(f"seed_repeats: {line}", flush=True),
        )
    result = repeats.seed_summary(bench, names, params, repeats=runs, rerun_stages=order)
    write_json(args.out, result)
    for n, s in result["top1"].items():
        spread = f" ± {s['std']:.2f}" if s["std"] is not None else ""
        print(f"seed_repeats: {n:24s} top-1 {s['mean']:.2f}%{spread} over {s['n_seeds']} seed(s)")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
