"""lowrank: SVD low-rank factorization of the teacher -> fine-tuning, at the pruned model's size.

The alternative to slim_prune at the same parameter budget: the report compares the two.
base.device / base.nproc apply as in every training stage (resnet_slim/train/distributed.py).
"""

import argparse

from resnet_slim.errors import run_stage


def factorize(args, params, device) -> None:
    from resnet_slim.checkpoints import save_checkpoint
    from resnet_slim.compress.lowrank import factorize_and_finetune
    from resnet_slim.io import write_json

    result = factorize_and_finetune(
        teacher_path=args.teacher,
        pruned_path=args.pruned,
        prepared_dir=args.data,
        reports=args.reports,
        p=params.lowrank,
        base=params.base,
        device=device,
    )
    if result is None:
        return  # not rank 0: rank 0 writes the outputs, once
    model, arch, metrics = result
    save_checkpoint(
        args.out, model=model, arch=arch, params=params.lowrank.model_dump(), metrics=metrics
    )
    write_json(f"{args.reports}/metrics.json", metrics)
    top1 = metrics["top1_test"]
    print(
        f"lowrank: {len(metrics['ranks'])} layers factorized, params "
        f"x{metrics['params']['ratio']:.3f} (target {metrics['params_ratio_target']:.3f}), MACs "
        f"x{metrics['macs']['ratio']:.3f}, test top-1 {top1['before']:.2f}% -> "
        f"{top1['after_factorization']:.2f}% -> {top1['after_finetune']:.2f}%"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument(
        "--pruned",
        required=True,
        help="its parameter share is the target when params_ratio is match_pruned",
    )
    for path in ("--data", "--out", "--reports"):  # dvc.yaml passes every path
        parser.add_argument(path, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from resnet_slim.params import load_params
    from resnet_slim.train.distributed import (
        run_training_stage,
    )  # torch: after parse_args (fast --help)
    from resnet_slim.train.resume import resumable

    params = load_params(args.params)
    return run_training_stage(
        module="stages.lowrank",
        argv=argv,
        base=params.base,
        batch_sizes={"lowrank.finetune.batch_size": params.lowrank.finetune.batch_size},
        train=resumable(
            args.out, params, "lowrank", lambda device: factorize(args, params, device)
        ),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
