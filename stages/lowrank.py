"""lowrank: SVD low-rank factorization of the teacher -> fine-tuning, at the pruned model's size.

The alternative to slim_prune at the same parameter budget: the report compares the two.
"""

import argparse

from resnet_slim import engine, lowrank, prune
from resnet_slim.data import BatchLoader, load_split, train_val_loaders
from resnet_slim.errors import run_stage
from resnet_slim.io import save_checkpoint, write_json
from resnet_slim.models import load_model
from resnet_slim.params import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument("--pruned", default="models/pruned.pt",
                        help="its parameter share is the target when params_ratio is match_pruned")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="models/lowrank.pt")
    parser.add_argument("--reports", default="reports/lowrank")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p, seed = params.lowrank, params.base.seed

    engine.seed_everything(seed, params.base.threads)
    train_loader, val_loader, meta = train_val_loaders(
        args.data, batch_size=p.finetune.batch_size, augment=params.base.augment, seed=seed)
    num_classes, size = len(meta["class_names"]), meta["image_size"]
    teacher, checkpoint = load_model(args.teacher, num_classes=num_classes)
    model, _ = load_model(args.teacher, num_classes=num_classes)  # factorized in place
    test = load_split(args.data, "test")
    test_loader = BatchLoader(test.images, test.labels, meta=meta, batch_size=256)

    pruned = None
    target = p.params_ratio
    if target == "match_pruned":  # non-zero counts: also right for unstructured (magnitude) pruning
        pruned, _ = load_model(args.pruned, num_classes=num_classes)
        target = prune.count_nonzero(pruned) / prune.count_nonzero(teacher)
    ranks = lowrank.choose_ranks(model, params_ratio=target, round_to=p.round_to)
    lowrank.factorize_svd(model, ranks)

    top1 = {"before": engine.evaluate(teacher, test_loader)["top1"],
            "after_factorization": engine.evaluate(model, test_loader)["top1"]}
    history = engine.fit(model, train_loader, val_loader, p.finetune, loss_fn=engine.cross_entropy(
        p.finetune.label_smoothing), live_dir=f"{args.reports}/finetune", desc="lowrank finetune")
    top1["after_finetune"] = engine.evaluate(model, test_loader)["top1"]

    counts = {"teacher": prune.count_macs_params(teacher, size),
              "lowrank": prune.count_macs_params(model, size)}
    if pruned is not None:
        counts["pruned"] = prune.count_macs_params(pruned, size)
    metrics = {"params_ratio_target": target, "round_to": p.round_to, "ranks": ranks,
               "top1_test": top1, "val_top1": history[-1]["val_top1"],
               "params": {k: v[1] for k, v in counts.items()},
               "macs": {k: v[0] for k, v in counts.items()}}
    for key in ("params", "macs"):
        metrics[key]["ratio"] = metrics[key]["lowrank"] / metrics[key]["teacher"]
    save_checkpoint(args.out, model=model, arch={**checkpoint["arch"], "lowrank": ranks},
                    params=p.model_dump(), metrics=metrics)
    write_json(f"{args.reports}/metrics.json", metrics)
    print(f"lowrank: {len(ranks)} layers factorized, params x{metrics['params']['ratio']:.3f} "
          f"(target {target:.3f}), MACs x{metrics['macs']['ratio']:.3f}, test top-1 "
          f"{top1['before']:.2f}% -> {top1['after_factorization']:.2f}% -> {top1['after_finetune']:.2f}%")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
