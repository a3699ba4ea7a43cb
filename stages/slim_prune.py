"""slim_prune: sparsity training (network slimming) -> channel removal -> fine-tuning of the
teacher. base.device / base.nproc apply as in every training stage
(resnet_slim/train/distributed.py)."""

import argparse

from resnet_slim.errors import run_stage


def prune_and_finetune(args, params, device) -> None:
    from resnet_slim.checkpoints import save_checkpoint
    from resnet_slim.compress.prune import plot_kept_channels, slim_prune_and_finetune
    from resnet_slim.io import read_json, write_json

    latency = params.prune.method == "latency"
    result = slim_prune_and_finetune(
        teacher_path=args.teacher,
        prepared_dir=args.data,
        reports=args.reports,
        p=params.prune,
        base=params.base,
        device=device,
        latency_table=(
            read_json(args.latency_table, "latency table")
            if latency and args.latency_table
            else None
        ),
    )
    if result is None:
        return  # not rank 0: rank 0 writes the outputs, once
    pruned, arch, metrics, rows = result
    p, top1 = params.prune, metrics["top1_test"]
    save_checkpoint(args.out, model=pruned, arch=arch, params=p.model_dump(), metrics=metrics)
    write_json(f"{args.reports}/metrics.json", metrics)
    write_json(f"{args.reports}/channels.json", rows)
    plot_kept_channels(rows, f"{args.reports}/channels.png")
    print(
        f"prune ({p.method}, ratio {p.ratio}): MACs x{metrics['macs']['ratio']:.3f}, params "
        f"x{metrics['params']['ratio']:.3f}, test top-1 {top1['before']:.2f}% -> "
        f"{top1['after_removal']:.2f}% -> {top1['after_finetune']:.2f}%"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    for path in ("--teacher", "--data", "--out", "--reports"):  # dvc.yaml passes every path
        parser.add_argument(path, required=True)
    parser.add_argument("--latency-table", default=None, help="for prune.method latency")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from resnet_slim.params import load_params
    from resnet_slim.train.distributed import (
        run_training_stage,
    )  # torch: after parse_args (fast --help)
    from resnet_slim.train.resume import resumable

    params = load_params(args.params)
    p = params.prune
    return run_training_stage(
        module="stages.slim_prune",
        argv=argv,
        base=params.base,
        batch_sizes={
            "prune.sparsity.batch_size": p.sparsity.batch_size,
            "prune.finetune.batch_size": p.finetune.batch_size,
        },
        train=resumable(
            args.out, params, "prune", lambda device: prune_and_finetune(args, params, device)
        ),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
