"""distill_student: train a small student from the teacher (logit + optional feature KD) with the
shared loop; optionally the same student without the teacher, to measure what KD adds.

distill.student.init starts the student (and its no-teacher baseline) from a trained model;
its architecture then comes from the file (resnet_slim/model_import.py)."""

import argparse
import copy
import sys

from resnet_slim import engine
from resnet_slim.data import BatchLoader, load_meta, load_split
from resnet_slim.distill import (StudentWithProjectors, distillation_loss,
                                 load_teacher_cache, stage_channels)
from resnet_slim.errors import run_stage
from resnet_slim.io import save_checkpoint, sha256_file, write_json
from resnet_slim.model_import import import_model, untracked_note
from resnet_slim.models import build_model, load_model, make_arch
from resnet_slim.prune import count_macs_params
from resnet_slim.params import load_params


def train_student(initial, loss_fn, train_targets, params, args, meta, *, desc, live_dir, projections):
    """Train a copy of `initial` with the shared loop; (student, test top-1)."""
    p = params.distill
    train = load_split(args.data, "train")
    val = load_split(args.data, "val")
    loaders = (BatchLoader(train.images, *train_targets, meta=meta, batch_size=p.batch_size,
                           shuffle=True, augment=params.base.augment, seed=params.base.seed),
               BatchLoader(val.images, val.labels, meta=meta, batch_size=256))
    model = StudentWithProjectors(copy.deepcopy(initial), projections)
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
    p, stages = params.distill, params.distill.stages_in_use

    meta = load_meta(args.data)
    labels = load_split(args.data, "train").labels
    teacher, checkpoint = load_model(args.teacher, num_classes=len(meta["class_names"]))
    num_classes, size = len(meta["class_names"]), meta["image_size"]
    origin = None
    engine.seed_everything(params.base.seed, params.base.threads)  # the student's initial weights
    if p.student.init is None:
        arch = make_arch(name=p.student.arch, num_classes=num_classes, width=p.student.width,
                         small_input=p.student.small_input)
        initial = build_model(arch)
    else:
        initial, arch, origin = import_model(p.student.init, p.student.format,
                                             num_classes=num_classes,
                                             replace_head=p.student.replace_head,
                                             key="distill.student")
        if note := untracked_note(origin):
            print(f"distill_student: warning: {note}", file=sys.stderr, flush=True)
    teacher_params, student_params = (count_macs_params(m, size)[1] for m in (teacher, initial))
    teacher_channels = stage_channels(teacher, size, stages, who="teacher")
    student_channels = stage_channels(initial, size, stages, who="student")
    projections = {k: (student_channels[k], teacher_channels[k]) for k in teacher_channels} \
        if p.feature_weight > 0 else {}

    if p.cache_teacher:
        cache = load_teacher_cache(args.cache, teacher_sha256=sha256_file(args.teacher),
                                   n_images=len(labels), stages=stages)
        targets = (labels, cache["logits"], *[cache[f"layer{k}"] for k in stages])
        loss_fn = distillation_loss(alpha=p.alpha, temperature=p.temperature,
                                    feature_weight=p.feature_weight, stages=stages)
    else:
        targets = (labels,)
        loss_fn = distillation_loss(alpha=p.alpha, temperature=p.temperature,
                                    feature_weight=p.feature_weight, teacher=teacher.eval(), stages=stages)
    # warned only now that every input is known good, so an input error stays one stderr line
    if student_params > teacher_params:
        print(f"distill_student: warning: the student ({student_params:,} parameters) is larger "
              f"than the teacher ({teacher_params:,}); distilling into it will not compress",
              file=sys.stderr)
    engine.seed_everything(params.base.seed, params.base.threads)
    student, kd_top1 = train_student(initial, loss_fn, targets, params, args, meta, desc="distill",
                                     live_dir=f"{args.reports}/kd", projections=projections)
    metrics = {"student_top1_kd": kd_top1, "alpha": p.alpha, "temperature": p.temperature,
               "feature_weight": p.feature_weight, "cache_teacher": p.cache_teacher}
    if p.train_baseline:
        engine.seed_everything(params.base.seed, params.base.threads)
        _, metrics["student_top1_no_kd"] = train_student(
            initial, engine.cross_entropy(p.label_smoothing), (labels,), params, args, meta,
            desc="student without teacher", live_dir=f"{args.reports}/no_kd", projections={})
        metrics["kd_gain_pp"] = kd_top1 - metrics["student_top1_no_kd"]
    if origin is not None:
        test = load_split(args.data, "test")
        origin["top1_as_imported"] = engine.evaluate(
            initial, BatchLoader(test.images, test.labels, meta=meta, batch_size=256))["top1"]
        metrics["student_origin"] = origin
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
