"""cache_teacher: run the teacher once over the training split; save its logits and features,
keyed by the teacher checkpoint's sha256, for every distillation run and sweep to reuse.

base.device / base.nproc apply as in every training stage: each process runs its share of the
split and rank 0 saves the outputs in the split's order (resnet_slim/train/distributed.py)."""

import argparse

from resnet_slim.errors import run_stage


def cache(args, params, device) -> None:
    from resnet_slim.compress.distill import cache_teacher_outputs, save_teacher_cache
    from resnet_slim.data.loader import load_meta
    from resnet_slim.io import sha256_file
    from resnet_slim.train import distributed
    from resnet_slim.train.engine import seed_everything
    from resnet_slim.train.models import load_model

    seed_everything(params.base.seed, distributed.threads_per_process(params.base.threads))
    teacher, _ = load_model(args.teacher, num_classes=len(load_meta(args.data)["class_names"]))
    outputs = cache_teacher_outputs(
        teacher, args.data, stages=params.distill.stages_in_use, device=device
    )
    if not distributed.is_main_process():
        return  # rank 0 holds the gathered outputs and writes them, once
    n_images = len(outputs["logits"])
    save_teacher_cache(
        args.out, outputs, teacher_sha256=sha256_file(args.teacher), n_images=n_images
    )
    print(f"cache_teacher: {n_images} images, {sorted(outputs)} -> {args.out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    # imported after parse_args: torch takes seconds, --help should not
    from resnet_slim.params import load_params
    from resnet_slim.train.distributed import run_training_stage

    params = load_params(args.params)
    # nothing is trained (no batch size to split); the teacher only runs forward
    return run_training_stage(
        module="stages.cache_teacher",
        argv=argv,
        base=params.base,
        batch_sizes={},
        train=lambda device: cache(args, params, device),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
