"""distill_student: train a small student from the teacher (logit + optional feature KD) with the
shared loop; optionally the same student without the teacher, to measure what KD adds."""

import argparse


from resnet_slim import engine
from resnet_slim.data import BatchLoader, load_meta, load_split
from resnet_slim.distill import (StudentWithProjectors, distillation_loss, file_sha256,
                                 load_teacher_cache, stage_channels)
from resnet_slim.errors import run_stage
from resnet_slim.io import save_checkpoint, write_json
from resnet_slim.models import build_model, load_model, make_arch
from resnet_slim.prune import count_macs_params
from resnet_slim.params import load_params


def train_student(arch, loss_fn, train_targets, params, args, meta, *, desc, live_dir, projections):
    p = params.distill
    train = load_split(args.data, "train")
    val = load_split(args.data, "val")
    loaders = (BatchLoader(train.images, *train_targets, meta=meta, batch_size=p.batch_size,
                           shuffle=True, augment=params.base.augment, seed=params.base.seed),
               BatchLoader(val.images, val.labels, meta=meta, batch_size=256))
    model = StudentWithProjectors(build_model(arch), projections)
    engine.fit(model, *loaders, p, loss_fn=loss_fn, live_dir=live_dir, desc=desc)
    test = load_split(args.data, "test")
    test_loader = BatchLoader(test.images, test.labels, meta=meta, batch_size=256)
    return model.student, engine.evaluate(model.student, test_loader)["top1"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument("--cache", default="models/teacher_outputs.pt")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="models/student.pt")
    parser.add_argument("--reports", default="reports/distill")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p, stages = params.distill, list(params.distill.feature_stages)

    meta = load_meta(args.data)
    labels = load_split(args.data, "train").labels
    teacher, checkpoint = load_model(args.teacher, num_classes=len(meta["class_names"]))
    arch = make_arch(name=p.student.arch, num_classes=len(meta["class_names"]), width=p.student.width,
                     small_input=p.student.small_input)
    size = meta["image_size"]
    teacher_channels = stage_channels(teacher, size, stages)
    student_channels = stage_channels(build_model(arch), size, stages)
    projections = {k: (student_channels[k], teacher_channels[k]) for k in teacher_channels} \
        if p.feature_weight > 0 else {}

    if p.cache_teacher:
        cache = load_teacher_cache(args.cache, teacher_sha256=file_sha256(args.teacher),
                                   n_images=len(labels), stages=stages)
        targets = (labels, cache["logits"], *[cache[f"layer{k}"] for k in stages])
        loss_fn = distillation_loss(alpha=p.alpha, temperature=p.temperature,
                                    feature_weight=p.feature_weight, stages=stages)
    else:
        targets = (labels,)
        loss_fn = distillation_loss(alpha=p.alpha, temperature=p.temperature,
                                    feature_weight=p.feature_weight, teacher=teacher.eval(), stages=stages)
    engine.seed_everything(params.base.seed, params.base.threads)
    student, kd_top1 = train_student(arch, loss_fn, targets, params, args, meta, desc="distill",
                                     live_dir=f"{args.reports}/kd", projections=projections)
    metrics = {"student_top1_kd": kd_top1, "alpha": p.alpha, "temperature": p.temperature,
               "feature_weight": p.feature_weight, "cache_teacher": p.cache_teacher}
    if p.train_baseline:
        engine.seed_everything(params.base.seed, params.base.threads)
        _, metrics["student_top1_no_kd"] = train_student(
            arch, engine.cross_entropy(p.label_smoothing), (labels,), params, args, meta,
            desc="student without teacher", live_dir=f"{args.reports}/no_kd", projections={})
        metrics["kd_gain_pp"] = kd_top1 - metrics["student_top1_no_kd"]
    macs, n_params = count_macs_params(student, size)
    teacher_macs, teacher_params = count_macs_params(teacher, size)
    metrics.update(macs=macs, params=n_params, macs_vs_teacher=macs / teacher_macs,
                   params_vs_teacher=n_params / teacher_params)
    save_checkpoint(args.out, model=student, arch=arch, params=p.model_dump(), metrics=metrics)
    write_json(f"{args.reports}/metrics.json", metrics)
    print("distill_student: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
