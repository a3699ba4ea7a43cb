"""train_teacher: train the FP32 ResNet teacher with the shared loop; save weights + architecture.

With teacher.init it starts from your own trained model instead (resnet_slim/model_import.py):
evaluated as imported, then fine-tuned on this data for teacher.epochs (0: used as is). The file,
its format, sha256 and top-1 before/after adaptation go into the checkpoint's metrics and
summary.json under "origin".

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
    from resnet_slim.data import BatchLoader, load_split, train_val_loaders
    from resnet_slim.io import save_checkpoint, write_together
    from resnet_slim.models import build_model, make_arch

    p, base = params.teacher, params.base
    rank, world_size = distributed.rank(), distributed.world_size()
    # rank 0 seeds like one process (same init; DDP broadcasts rank 0's weights anyway)
    engine.seed_everything(base.seed + rank, distributed.threads_per_process(base.threads))
    train_loader, val_loader, meta = train_val_loaders(
        args.data, batch_size=p.batch_size, augment=base.augment, seed=base.seed, rank=rank,
        world_size=world_size)
    num_classes = len(meta["class_names"])
    if p.init is None:
        arch = make_arch(name=p.arch, num_classes=num_classes, width=p.width,
                         small_input=p.small_input)
        model, origin = build_model(arch), None
    else:
        from resnet_slim.model_import import import_model, untracked_note
        model, arch, origin = import_model(p.init, p.format, num_classes=num_classes,
                                           replace_head=p.replace_head)
        if (note := untracked_note(origin)) and distributed.is_main_process():
            print(f"teacher: warning: {note}", file=sys.stderr, flush=True)
    model = distributed.wrap_model(model, device, sync_bn=base.sync_bn)
    if origin is not None:
        test = load_split(args.data, "test")
        test_loader = BatchLoader(test.images, test.labels, meta=meta, batch_size=256, rank=rank,
                                  world_size=world_size, pad=False)

        def top1() -> dict:
            plain = distributed.unwrap(model)
            return {split: round(engine.evaluate(plain, loader)["top1"], 3)
                    for split, loader in (("val", val_loader), ("test", test_loader))}
        origin["top1_as_imported"] = top1()
        print(f"teacher: imported {origin['family']} ({origin['format']}) from {p.init}: top-1 "
              f"val {origin['top1_as_imported']['val']:.2f}%, test "
              f"{origin['top1_as_imported']['test']:.2f}% as imported (teacher.arch/width/"
              f"small_input come from the file)", flush=True)
    history = []
    if p.epochs > 0:  # 0 only with teacher.init: the imported model is used as it is
        history = engine.fit(model, train_loader, val_loader, p, loss_fn=engine.cross_entropy(
            p.label_smoothing), live_dir=args.live, desc="teacher", channels_last=True)
    if origin is not None:
        origin["top1_after_adaptation"] = top1() if history else None
    if not distributed.is_main_process():
        return  # rank 0 writes the outputs, once
    metrics = {"val_top1": history[-1]["val_top1"] if history else origin["top1_as_imported"]["val"],
               "epochs": p.epochs, "val_top1_curve": [round(h["val_top1"], 3) for h in history]}
    if origin is not None:
        metrics["origin"] = origin
    model = distributed.unwrap(model).cpu()  # a plain CPU checkpoint, whatever trained it
    # the checkpoint and its summary are one set: summary.json, written last, records the
    # checkpoint's sha256, so an interrupt between the two cannot pass as a finished run
    write_together({"checkpoint": (args.out, lambda tmp: save_checkpoint(
        tmp, model=model, arch=arch, params=p.model_dump(), metrics=metrics, atomic=False))},
        record=f"{args.live}/summary.json", content=metrics)


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
            nproc, module="stages.train_teacher", argv=sys.argv[1:] if argv is None else list(argv))
    with distributed.process_group(device):
        train(args, params, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
