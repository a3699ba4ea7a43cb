"""distill_student: train a small student from the teacher (logit + optional feature KD) with the
shared loop; optionally the same student without the teacher, to measure what KD adds.

distill.student.init starts the student (and its no-teacher baseline) from a trained model;
its architecture then comes from the file (resnet_slim/train/model_import.py).
distill.student.fit_to_budget first prunes that student to prune.latency's budget and size target
(or its own fit_speedup / fit_max_params_ratio; the latency table's units, priced on validation), so
a nearly fast enough student fits the gate; distill.student.fit_after_epochs distils it that many
epochs before the fit (priced on a student adapted to the data), distill.epochs after.
base.device and base.nproc apply as in every training stage (resnet_slim/train/distributed.py)."""

import argparse

from resnet_slim.errors import run_stage


def distill(args, params, device) -> None:
    from resnet_slim.checkpoints import save_checkpoint
    from resnet_slim.compress.student import distill_student
    from resnet_slim.io import read_json, write_json
    from resnet_slim.train import distributed

    table = None
    if params.distill.student.fit_to_budget:
        table = read_json(args.latency_table, "latency table")
    student, arch, metrics = distill_student(
        teacher_path=args.teacher,
        cache_path=args.cache,
        prepared_dir=args.data,
        reports=args.reports,
        p=params.distill,
        base=params.base,
        device=device,
        fit=params.distill.student.fit_params(params.prune.latency),
        latency_table=table,
    )
    if not distributed.is_main_process():
        return  # rank 0 writes the outputs, once
    save_checkpoint(
        args.out, model=student, arch=arch, params=params.distill.model_dump(), metrics=metrics
    )
    write_json(f"{args.reports}/metrics.json", metrics)
    print(
        "distill_student: "
        + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        )
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cache", required=True, help="teacher outputs (cache_teacher stage)")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--reports", required=True)
    parser.add_argument(
        "--latency-table",
        default="reports/latency_table.json",
        help="read with distill.student.fit_to_budget",
    )
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    # imported after parse_args: torch takes seconds, --help should not
    from resnet_slim.params import load_params
    from resnet_slim.train.distributed import run_training_stage
    from resnet_slim.train.resume import resumable

    params = load_params(args.params)
    return run_training_stage(
        module="stages.distill_student",
        argv=argv,
        base=params.base,
        batch_sizes={"distill.batch_size": params.distill.batch_size},
        train=resumable(args.out, params, "distill", lambda device: distill(args, params, device)),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
