"""train_teacher: train the FP32 ResNet teacher with the shared loop; save weights + architecture."""

import argparse

from resnet_slim import engine
from resnet_slim.data import train_val_loaders
from resnet_slim.errors import run_stage
from resnet_slim.io import save_checkpoint, write_json
from resnet_slim.models import build_model, make_arch
from resnet_slim.params import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="models/teacher.pt")
    parser.add_argument("--live", default="reports/teacher", help="DVCLive directory")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p = params.teacher

    engine.seed_everything(params.base.seed, params.base.threads)
    train_loader, val_loader, meta = train_val_loaders(args.data, batch_size=p.batch_size,
                                                       augment=params.base.augment, seed=params.base.seed)
    arch = make_arch(name=p.arch, num_classes=len(meta["class_names"]), width=p.width,
                     small_input=p.small_input)
    model = build_model(arch)
    history = engine.fit(model, train_loader, val_loader, p, loss_fn=engine.cross_entropy(
        p.label_smoothing), live_dir=args.live, desc="teacher")
    metrics = {"val_top1": history[-1]["val_top1"], "epochs": p.epochs,
               "val_top1_curve": [round(h["val_top1"], 3) for h in history]}
    save_checkpoint(args.out, model=model, arch=arch, params=p.model_dump(), metrics=metrics)
    write_json(f"{args.live}/summary.json", metrics)


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
