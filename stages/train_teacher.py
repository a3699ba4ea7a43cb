"""train_teacher: train the FP32 ResNet teacher with the shared loop; save weights + architecture.

With teacher.init it starts from your own trained model instead (resnet_slim/train/model_import.py):
evaluated as imported, then fine-tuned on this data for teacher.epochs (0: used as is). The file,
its format, sha256 and top-1 before/after adaptation go into the checkpoint's metrics and
summary.json under "origin". base.device / base.nproc apply as in every training stage; several
machines: run `torchrun --nnodes ...` on this script directly (resnet_slim/train/distributed.py).
"""

import argparse
import os
from pathlib import Path

from resnet_slim.errors import run_stage


def train(args, params, device) -> None:
    # imported here: the torchrun launcher process only reads params (saves ~5 s per launch)
    from resnet_slim.checkpoints import save_checkpoint
    from resnet_slim.io import replace_together, sha256_file, staging_dir, write_json
    from resnet_slim.train import distributed
    from resnet_slim.train.teacher import train_teacher

    # the live curves go to a staging folder: a run stopped part-way leaves the previous
    # checkpoint with its own curves, never the stopped run's curves beside the old weights
    with staging_dir(args.live) as live:
        model, arch, metrics = train_teacher(
            args.data, p=params.teacher, base=params.base, device=device, live_dir=live
        )
        if not distributed.is_main_process():
            return  # rank 0 writes the outputs, once
        checkpoint = {}

        def write_checkpoint(tmp: Path) -> None:
            save_checkpoint(
                tmp,
                model=model,
                arch=arch,
                params=params.teacher.model_dump(),
                metrics=metrics,
                atomic=False,
            )
            checkpoint["sha256"] = sha256_file(tmp)

        def write_live(tmp: Path) -> None:
            # summary.json records the checkpoint's sha256 (io.check_together reads it), so a
            # checkpoint and curves from different runs cannot pass as one finished run
            os.replace(live, tmp)
            write_json(
                tmp / "summary.json",
                {**metrics, "outputs": {"checkpoint": {"path": str(args.out), **checkpoint}}},
            )

        replace_together({args.out: write_checkpoint, args.live: write_live})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--live", required=True, help="DVCLive directory")
    args = parser.parse_args(argv)
    from resnet_slim.params import load_params
    from resnet_slim.train.distributed import (
        run_training_stage,
    )  # torch: after parse_args (fast --help)
    from resnet_slim.train.resume import resumable

    params = load_params(args.params)
    return run_training_stage(
        module="stages.train_teacher",
        argv=argv,
        base=params.base,
        batch_sizes={"teacher.batch_size": params.teacher.batch_size},
        train=resumable(args.out, params, "teacher", lambda device: train(args, params, device)),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
