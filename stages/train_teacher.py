"""train_teacher: train the FP32 ResNet teacher with the shared loop; save weights + architecture.

With teacher.init it starts from your own trained model instead (resnet_slim/model_import.py):
evaluated as imported, then fine-tuned on this data for teacher.epochs (0: used as is). The file,
its format, sha256 and top-1 before/after adaptation go into the checkpoint's metrics and
summary.json under "origin". base.device / base.nproc apply as in every training stage; several
machines: run `torchrun --nnodes ...` on this script directly (resnet_slim/distributed.py).
"""

import argparse

from resnet_slim.errors import run_stage


def train(args, params, device) -> None:
    # imported here: the torchrun launcher process only reads params (saves ~5 s per launch)
    from resnet_slim import distributed, engine
    from resnet_slim.io import save_checkpoint, write_together

    model, arch, metrics = engine.train_teacher(
        args.data, params=params, device=device, live_dir=args.live
    )
    if not distributed.is_main_process():
        return  # rank 0 writes the outputs, once
    # the checkpoint and its summary are one set: summary.json, written last, records the
    # checkpoint's sha256, so an interrupt between the two cannot pass as a finished run
    write_together(
        {
            "checkpoint": (
                args.out,
                lambda tmp: save_checkpoint(
                    tmp,
                    model=model,
                    arch=arch,
                    params=params.teacher.model_dump(),
                    metrics=metrics,
                    atomic=False,
                ),
            )
        },
        record=f"{args.live}/summary.json",
        content=metrics,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--live", required=True, help="DVCLive directory")
    args = parser.parse_args(argv)
    from resnet_slim.distributed import run_training_stage  # torch: after parse_args (fast --help)
    from resnet_slim.params import load_params

    params = load_params(args.params)
    return run_training_stage(
        module="stages.train_teacher",
        argv=argv,
        base=params.base,
        batch_sizes={"teacher.batch_size": params.teacher.batch_size},
        train=lambda device: train(args, params, device),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
