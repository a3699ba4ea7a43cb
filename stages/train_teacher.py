"""train_teacher: train the FP32 ResNet teacher with the shared loop; save weights + architecture.

base.nproc > 1 re-launches this script under torchrun (DDP, one shard of each epoch per process);
several machines: run `torchrun --nnodes ...` on this script directly (resnet_slim/distributed.py).
"""

import argparse
import sys

from resnet_slim import distributed
from resnet_slim.errors import run_stage
from resnet_slim.params import load_params


def train(args, params, device) -> None:
    # imported here: the torchrun launcher process only reads params (saves ~5 s per launch)
    from resnet_slim import engine
    from resnet_slim.data import train_val_loaders
    from resnet_slim.io import save_checkpoint, write_json
    from resnet_slim.models import build_model, make_arch

    p, base = params.teacher, params.base
    rank, world_size = distributed.rank(), distributed.world_size()
    # rank 0 seeds like one process (same init; DDP broadcasts rank 0's weights anyway)
    engine.seed_everything(base.seed + rank, distributed.threads_per_process(base.threads))
    train_loader, val_loader, meta = train_val_loaders(
        args.data, batch_size=p.batch_size, augment=base.augment, seed=base.seed, rank=rank,
        world_size=world_size)
    arch = make_arch(name=p.arch, num_classes=len(meta["class_names"]), width=p.width,
                     small_input=p.small_input)
    model = distributed.wrap_model(build_model(arch), device, sync_bn=base.sync_bn)
    history = engine.fit(model, train_loader, val_loader, p, loss_fn=engine.cross_entropy(
        p.label_smoothing), live_dir=args.live, desc="teacher", channels_last=True)
    if not distributed.is_main_process():
        return  # rank 0 writes the outputs, once
    metrics = {"val_top1": history[-1]["val_top1"], "epochs": p.epochs,
               "val_top1_curve": [round(h["val_top1"], 3) for h in history]}
    model = distributed.unwrap(model).cpu()  # a plain CPU checkpoint, whatever trained it
    save_checkpoint(args.out, model=model, arch=arch, params=p.model_dump(), metrics=metrics)
    write_json(f"{args.live}/summary.json", metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="models/teacher.pt")
    parser.add_argument("--live", default="reports/teacher", help="DVCLive directory")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    base = params.base
    device = distributed.resolve_device(base.device)
    nproc = distributed.planned_world_size(base.nproc)
    distributed.check_plan(nproc=nproc, device=device, sync_bn=base.sync_bn,
                           batch_size=params.teacher.batch_size)
    if nproc > 1 and not distributed.under_torchrun():
        return distributed.launch_with_torchrun(
            nproc, script=__file__, argv=sys.argv[1:] if argv is None else list(argv))
    with distributed.process_group(device):
        train(args, params, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
