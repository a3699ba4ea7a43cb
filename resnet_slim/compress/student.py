"""The distill_student stage's work: build (or import) the student, train it from the teacher
(resnet_slim/compress/distill.py: cached targets, the KD loss, the feature projectors) and, for
comparison, without it; measure what KD adds and what the student costs.
"""

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet_slim import registry, stats
from resnet_slim.compress.distill import (
    StudentWithProjectors,
    distillation_loss,
    load_teacher_cache,
    stage_channels,
)
from resnet_slim.compress.latency_prune import prune_on_validation
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.io import sha256_file
from resnet_slim.params import BaseParams, DistillParams, LatencyPruneParams
from resnet_slim.train import distributed, engine


def train_student(
    initial: nn.Module,
    loss_fn,
    train_targets: tuple,
    *,
    prepared_dir: str | Path,
    meta: dict,
    p: DistillParams,
    base: BaseParams,
    device: torch.device,
    desc: str,
    live_dir: str | Path,
    projections: dict[str, tuple[int, int]],
) -> tuple[nn.Module, float]:
    """Train a copy of `initial` (plus projectors) with the shared loop on this process's shard of
    the training split; (the plain CPU student, its test top-1)."""
    rank, world_size = distributed.rank(), distributed.world_size()
    train = data.load_split(prepared_dir, "train")
    train_loader = data.BatchLoader(
        train.images,
        *train_targets,
        meta=meta,
        batch_size=p.batch_size // world_size,
        shuffle=True,
        augment=base.augment,
        seed=base.seed,
        rank=rank,
        world_size=world_size,
    )
    model, _ = engine.fit_on(
        device,
        StudentWithProjectors(copy.deepcopy(initial), projections),
        train_loader,
        engine.eval_loader(prepared_dir, "val", meta),
        p,
        sync_bn=base.sync_bn,
        loss_fn=loss_fn,
        live_dir=live_dir,
        desc=desc,
    )
    test_loader = engine.eval_loader(prepared_dir, "test", meta)
    return model.student, engine.evaluate(model.student, test_loader)["top1"]


def correct_on_test(model: nn.Module, prepared_dir: str | Path, meta: dict) -> np.ndarray:
    """Per-image correctness of `model` on the whole test split, in this process alone."""
    test = data.load_split(prepared_dir, "test")
    loader = data.BatchLoader(test.images, test.labels, meta=meta, batch_size=256, pad=False)
    logits, labels = engine.predict(model, loader)
    return (logits.argmax(1) == labels).numpy()


def distill_student(
    *,
    teacher_path: str | Path,
    cache_path: str | Path,
    prepared_dir: str | Path,
    reports: str | Path,
    p: DistillParams,
    base: BaseParams,
    device: torch.device,
    fit: LatencyPruneParams | None = None,
    latency_table: dict | None = None,
) -> tuple[nn.Module, dict, dict]:
    """The distill_student stage's work: (student, its architecture record, metrics).

    The student learns from the teacher (cached outputs, or the teacher run on each batch) and,
    with distill.train_baseline, the same student trains without it to measure what KD adds.
    With distill.student.fit_to_budget the initial student is first pruned to `fit`'s latency
    budget and size target (prune.latency, relative to the teacher) over `latency_table`; with
    distill.student.fit_after_epochs it is distilled that many epochs first (its own schedule),
    so the fit prices blocks of a student adapted to the data.
    Every process returns the same; the caller writes on rank 0. Warnings print on rank 0.
    """
    from resnet_slim.compress.export import count_macs_params  # onnx: only when counting

    stages = p.stages_in_use
    threads = distributed.threads_per_process(base.threads)
    meta = data.load_meta(prepared_dir)
    labels = data.load_split(prepared_dir, "train").labels
    size = meta["image_size"]
    teacher, initial, arch, origin = _teacher_and_student(teacher_path, p, meta, base.seed, threads)
    targets, loss_fn = _targets_and_loss(
        p, stages, labels, teacher, teacher_path=teacher_path, cache_path=cache_path, device=device
    )
    common = dict(prepared_dir=prepared_dir, meta=meta, p=p, base=base, device=device)
    imported, fit_plan, before_fit = initial, None, {}
    if p.student.fit_to_budget:
        # a student nearly fast and small enough (a ResNet-32 for a ResNet-56 at a 4x budget)
        # loses a few blocks, priced on its own validation loss, then distillation trains the rest
        if fit is None:
            raise UserError("distill.student.fit_to_budget needs prune.latency")
        if p.student.fit_after_epochs:
            # priced as imported (a ResNet-32 at 82 % on these JPEGs, 89 % after 4 KD epochs), a
            # block's loss measures the domain shift more than what the block holds
            engine.seed_everything(base.seed, threads)
            initial, before_fit_top1 = train_student(
                initial,
                loss_fn,
                targets,
                desc="distill before the fit",
                live_dir=f"{reports}/kd_before_fit",
                projections=_projections(teacher, initial, size, stages, p.feature_weight),
                **{**common, "p": p.model_copy(update={"epochs": p.student.fit_after_epochs})},
            )
            before_fit = {"student_top1_before_fit": before_fit_top1}
        initial, arch, fit_plan = prune_on_validation(
            initial,
            arch,
            table=latency_table,
            p=fit,
            prepared_dir=prepared_dir,
            image_size=size,
            reference=teacher,
            needed_by="distill.student.fit_to_budget",
        )
    teacher_macs, teacher_params = count_macs_params(teacher, size)
    student_params = count_macs_params(initial, size)[1]
    projections = _projections(teacher, initial, size, stages, p.feature_weight)
    _warn_if_larger(student_params, teacher_params)  # only now: every input is known good
    engine.seed_everything(base.seed, threads)
    student, kd_top1 = train_student(
        initial,
        loss_fn,
        targets,
        desc="distill",
        live_dir=f"{reports}/kd",
        projections=projections,
        **common,
    )
    metrics = {"student_top1_kd": kd_top1, "alpha": p.alpha, "temperature": p.temperature}
    metrics.update(before_fit)
    metrics.update(feature_weight=p.feature_weight, cache_teacher=p.cache_teacher)
    if p.train_baseline:
        no_kd = _baseline_metrics(p, student, kd_top1, initial, labels, reports, threads, common)
        metrics.update(no_kd)
    if origin is not None:
        metrics["student_origin"] = _as_imported(origin, imported, prepared_dir, meta)
    if fit_plan is not None:
        metrics["latency_plan"] = fit_plan
    metrics.update(_size_metrics(student, size, teacher_macs, teacher_params))
    return student, arch, metrics


def _teacher_and_student(
    teacher_path: str | Path, p, meta: dict, seed: int, threads: int
) -> tuple[nn.Module, nn.Module, dict, dict | None]:
    """(teacher, initial student, the student's architecture record, its origin when imported,
    else None): the student built from distill.student's arch/width, or imported from
    distill.student.init.

    The student's initial weights come from the same seed on every rank, so every rank builds the
    same student (and evaluates the same one as imported); DDP then starts from rank 0's anyway.
    """
    from resnet_slim.train.model_import import import_model, untracked_note
    from resnet_slim.train.models import build_model, load_model, make_arch

    num_classes = len(meta["class_names"])
    teacher, _ = load_model(teacher_path, num_classes=num_classes)
    engine.seed_everything(seed, threads)
    if p.student.init is None:
        arch = make_arch(
            name=p.student.arch,
            num_classes=num_classes,
            width=p.student.width,
            small_input=p.student.small_input,
        )
        return teacher, build_model(arch), arch, None
    initial, arch, origin = import_model(
        p.student.init,
        p.student.format,
        num_classes=num_classes,
        replace_head=p.student.replace_head,
        key="distill.student",
    )
    if (note := untracked_note(origin)) and distributed.is_main_process():
        print(f"distill_student: warning: {note}", file=sys.stderr, flush=True)
    check_student(initial, arch, source=p.student.init)
    return teacher, initial, arch, origin


def check_student(model: nn.Module, arch: dict, *, source: str) -> None:
    """Refuse, before any training, a student the stages after distillation cannot take: one
    without the Student contract (models.Student), or a family QAT cannot train (qat@student
    quantizes every student). params.py refuses a built one by name; this covers imported ones."""
    from resnet_slim.train.models import Student

    if not isinstance(model, Student):
        raise UserError(
            f"distill.student.init: {source} gives a {type(model).__name__}, which lacks "
            f"forward_features / classifier_name (the Student contract in train/models.py)"
        )
    if arch["name"] not in registry.QAT_ARCHS:
        raise UserError(
            f"distill.student.init: {source} holds a {arch['name']}, which cannot be QAT-trained, "
            f"and every run quantizes the student (qat@student); use a ResNet student"
        )


def _projections(
    teacher: nn.Module, student: nn.Module, size: int, stages: list[int], feature_weight: float
) -> dict[str, tuple[int, int]]:
    """{"layer<k>": (student channels, teacher channels)} for the feature term's projectors
    (none without it). Both models' stages are checked either way, so a bad
    distill.feature_stages is refused before any training."""
    teacher_channels = stage_channels(teacher, size, stages, who="teacher")
    student_channels = stage_channels(student, size, stages, who="student")
    if feature_weight > 0:
        return {k: (student_channels[k], teacher_channels[k]) for k in teacher_channels}
    return {}


def _targets_and_loss(p, stages, labels, teacher, *, teacher_path, cache_path, device):
    """(training targets, loss): the cached teacher outputs checked against this teacher and
    split, or just the labels with the teacher run on each batch (distill.cache_teacher false)."""
    if p.cache_teacher:
        cache = load_teacher_cache(
            cache_path,
            teacher_sha256=sha256_file(teacher_path),
            n_images=len(labels),
            stages=stages,
        )
        targets = (labels, cache["logits"], *[cache[f"layer{k}"] for k in stages])
        loss_fn = distillation_loss(
            alpha=p.alpha, temperature=p.temperature, feature_weight=p.feature_weight, stages=stages
        )
        return targets, loss_fn
    # run on every batch, on the student's device; not trained, so no DDP
    loss_fn = distillation_loss(
        alpha=p.alpha,
        temperature=p.temperature,
        feature_weight=p.feature_weight,
        teacher=copy.deepcopy(teacher).to(device).eval(),  # `teacher` itself is measured on CPU
        stages=stages,
    )
    return (labels,), loss_fn


def _warn_if_larger(student_params: int, teacher_params: int) -> None:
    """A student larger than its teacher trains fine but compresses nothing: say so (rank 0)."""
    if student_params > teacher_params and distributed.is_main_process():
        print(
            f"distill_student: warning: the student ({student_params:,} parameters) is larger "
            f"than the teacher ({teacher_params:,}); distilling into it will not compress",
            file=sys.stderr,
        )


def _baseline_metrics(
    p, student: nn.Module, kd_top1: float, initial: nn.Module, labels, reports, threads, common
) -> dict:
    """What KD adds: the same student from the same start and seed, trained without the teacher;
    its top-1, the gain, and on rank 0 the gain's paired CI and McNemar p over the test images."""
    prepared_dir, meta = common["prepared_dir"], common["meta"]
    engine.seed_everything(common["base"].seed, threads)
    baseline, no_kd_top1 = train_student(
        initial,
        engine.cross_entropy(p.label_smoothing),
        (labels,),
        desc="student without teacher",
        live_dir=f"{reports}/no_kd",
        projections={},
        **common,
    )
    metrics = {"student_top1_no_kd": no_kd_top1, "kd_gain_pp": kd_top1 - no_kd_top1}
    if distributed.is_main_process():  # paired over the same test images: is the gain > noise?
        gain = stats.paired_drop(
            correct_on_test(student, prepared_dir, meta),
            correct_on_test(baseline, prepared_dir, meta),
        )
        metrics["kd_gain_ci_pp"] = [gain["ci_low"], gain["ci_high"]]
        metrics["kd_mcnemar_p"] = gain["mcnemar"]["p_value"]
    return metrics


def _as_imported(origin: dict, initial: nn.Module, prepared_dir: str | Path, meta: dict) -> dict:
    """An imported student's origin record, with its test top-1 before any distillation."""
    test_loader = engine.eval_loader(prepared_dir, "test", meta)
    origin["top1_as_imported"] = engine.evaluate(initial, test_loader)["top1"]
    return origin


def _size_metrics(student: nn.Module, size: int, teacher_macs: int, teacher_params: int) -> dict:
    """The trained student's MACs and parameters, alone and as a share of the teacher's."""
    from resnet_slim.compress.export import count_macs_params  # onnx: only when counting

    macs, n_params = count_macs_params(student, size)
    return {
        "macs": macs,
        "params": n_params,
        "macs_vs_teacher": macs / teacher_macs,
        "params_vs_teacher": n_params / teacher_params,
    }
