"""slim_prune: sparsity training (network slimming) -> channel removal -> fine-tuning of the teacher."""

import argparse

from resnet_slim import engine, prune
from resnet_slim.data import BatchLoader, load_meta, load_split, train_val_loaders
from resnet_slim.errors import run_stage
from resnet_slim.io import save_checkpoint, write_json
from resnet_slim.models import build_model, channel_record, load_model
from resnet_slim.params import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="models/pruned.pt")
    parser.add_argument("--reports", default="reports/prune")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p, seed = params.prune, params.base.seed

    engine.seed_everything(seed, params.base.threads)
    teacher, checkpoint = load_model(args.teacher,
                                     num_classes=len(load_meta(args.data)["class_names"]))
    model = build_model(checkpoint["arch"])
    model.load_state_dict(checkpoint["state_dict"])

    def loaders(train_params):
        return train_val_loaders(args.data, batch_size=train_params.batch_size,
                                 augment=params.base.augment, seed=seed)

    _, val_loader, meta = loaders(p.finetune)
    test = load_split(args.data, "test")
    test_loader = BatchLoader(test.images, test.labels, meta=meta, batch_size=256)
    size = meta["image_size"]
    top1 = {"before": engine.evaluate(teacher, test_loader)["top1"]}
    val_top1 = {"before": engine.evaluate(teacher, val_loader)["top1"]}

    if p.method == "bn_slimming" and p.sparsity.epochs > 0:
        train_loader, _, _ = loaders(p.sparsity)
        engine.fit(model, train_loader, val_loader, p.sparsity, loss_fn=engine.cross_entropy(
            p.sparsity.label_smoothing), live_dir=f"{args.reports}/sparsity", desc="sparsity",
            after_backward=prune.bn_l1_hook(p.sparsity.l1_lambda))
        top1["after_sparsity"] = engine.evaluate(model, test_loader)["top1"]
    if p.method == "magnitude":
        pruned = prune.prune_unstructured(model, ratio=p.ratio)
        keep_zeros = prune.keep_zeros_hook(pruned)
    else:
        pruned = prune.prune_channels(model, method=p.method, ratio=p.ratio, round_to=p.round_to,
                                      global_pruning=p.global_pruning, image_size=size)
        keep_zeros = None
    top1["after_removal"] = engine.evaluate(pruned, test_loader)["top1"]

    train_loader, _, _ = loaders(p.finetune)
    history = engine.fit(pruned, train_loader, val_loader, p.finetune, loss_fn=prune.finetune_loss(
        teacher, kd_alpha=p.kd_alpha, temperature=p.temperature,
        label_smoothing=p.finetune.label_smoothing), live_dir=f"{args.reports}/finetune",
        desc="finetune", after_backward=keep_zeros)
    top1["after_finetune"] = engine.evaluate(pruned, test_loader)["top1"]

    (t_macs, t_params), (s_macs, s_params) = (prune.count_macs_params(m, size)
                                              for m in (teacher, pruned))
    rows = prune.kept_channels(channel_record(teacher), channel_record(pruned))
    val_top1["after_finetune"] = history[-1]["val_top1"]
    metrics = {"method": p.method, "ratio": p.ratio, "top1_test": top1, "top1_val": val_top1,
               "macs": {"teacher": t_macs, "pruned": s_macs, "ratio": s_macs / t_macs},
               "params": {"teacher": t_params, "pruned": s_params, "ratio": s_params / t_params},
               "nonzero_params": {"teacher": prune.count_nonzero(teacher),
                                  "pruned": prune.count_nonzero(pruned)},
               "channels_kept": sum(r["after"] for r in rows) / sum(r["before"] for r in rows)}
    arch = {**checkpoint["arch"], "channels": channel_record(pruned)}
    save_checkpoint(args.out, model=pruned, arch=arch, params=p.model_dump(), metrics=metrics)
    write_json(f"{args.reports}/metrics.json", metrics)
    write_json(f"{args.reports}/channels.json", rows)
    prune.plot_kept_channels(rows, f"{args.reports}/channels.png")
    print(f"prune ({p.method}, ratio {p.ratio}): MACs x{s_macs / t_macs:.3f}, params "
          f"x{s_params / t_params:.3f}, test top-1 {top1['before']:.2f}% -> "
          f"{top1['after_removal']:.2f}% -> {top1['after_finetune']:.2f}%")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
