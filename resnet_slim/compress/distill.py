"""Knowledge distillation: a small student learns from the FP32 teacher's logits and features.

Loss (Hinton et al. 2015, arXiv:1503.02531; feature term as in FitNets, arXiv:1412.6550):
    α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y) + β·Σ_stages MSE(proj(s_k), t_k)
The T² keeps the soft term's gradient scale independent of T.

Teacher outputs are computed once per training image and cached (a DVC-tracked file keyed by the
teacher checkpoint's hash), so re-running distillation with another α or T never re-runs the
teacher. The cache is exact when the student sees the same un-augmented images; with augmentation
on, the student sees shifted/flipped images while the targets stay those of the clean image (a
common, cheap approximation) — set `distill.cache_teacher: false` to run the teacher on every
augmented batch instead (exact, slower).

On several processes (resnet_slim/train/distributed.py) the cache is computed shard by shard and put
back in order on rank 0, and the student trains under DDP like every other model.
"""

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from resnet_slim import stats
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path, safe_torch_load, sha256_file
from resnet_slim.train import distributed, engine


def check_feature_stages(stages: list[int], n_stages: int, *, who: str) -> None:
    """A ResNet has 4 stages (layer1..layer4), a CIFAR ResNet 3: name what is possible."""
    beyond = [k for k in stages if not 1 <= k <= n_stages]
    if beyond:
        raise UserError(
            f"distill.feature_stages {list(stages)}: the {who} has {n_stages} stages "
            f"(layer1..layer{n_stages}), so {beyond} do not exist; choose among "
            f"{list(range(1, n_stages + 1))} (a CIFAR ResNet's last stage is 3)"
        )


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module, images: torch.Tensor, *, stages: list[int], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Logits and the chosen stage outputs (1..4 = layer1..layer4) for every image, in order."""
    teacher.eval()
    logits, features = [], {k: [] for k in stages}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        stage_outputs = teacher.forward_features(batch)
        check_feature_stages(stages, len(stage_outputs), who="teacher")
        logits.append(teacher.forward_head(stage_outputs[-1]))
        for k in stages:
            features[k].append(stage_outputs[k - 1])
    return {"logits": torch.cat(logits), **{f"layer{k}": torch.cat(v) for k, v in features.items()}}


def cache_teacher_outputs(
    teacher: nn.Module, prepared_dir: str | Path, *, stages: list[int], device: torch.device
) -> dict[str, torch.Tensor] | None:
    """`teacher_outputs` for every training image, in the split's order, as CPU tensors.

    Each process runs the teacher on its share of the split (`engine.eval_loader`, the same
    256-image batches as one process when there is one) and rank 0 gathers the shares back in
    order (`distributed.gather_in_order`); the other ranks get None.
    """
    loader = engine.eval_loader(prepared_dir, "train", data.load_meta(prepared_dir))
    total = len(loader.images)
    if total < distributed.world_size():  # a rank with no image would have nothing to gather
        raise UserError(
            f"{prepared_dir}: {total} training images for {distributed.world_size()} "
            f"processes; lower base.nproc"
        )
    teacher = teacher.to(device)  # only run forward: no DDP (each rank loaded the same file)
    parts = []
    for images, _ in loader:
        outputs = teacher_outputs(teacher, images.to(device), stages=stages, batch_size=len(images))
        parts.append({key: value.cpu() for key, value in outputs.items()})
    gathered = {
        key: distributed.gather_in_order(torch.cat([part[key] for part in parts]), total)
        for key in parts[0]
    }  # every rank takes part in every gather
    return gathered if distributed.is_main_process() else None


def save_teacher_cache(
    path: str | Path, outputs: dict[str, torch.Tensor], *, teacher_sha256: str, n_images: int
) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {"outputs": outputs, "teacher_sha256": teacher_sha256, "n_images": n_images}, tmp
        )


def load_teacher_cache(
    path: str | Path, *, teacher_sha256: str, n_images: int, stages: list[int] = ()
) -> dict:
    """Cached outputs, refused when they belong to another teacher or another training split."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: teacher-output cache not found; run the cache_teacher stage")
    cache = safe_torch_load(path, what="teacher-output cache")
    if not isinstance(cache, dict) or not isinstance(cache.get("outputs"), dict):
        raise UserError(
            f"{path}: not a teacher-output cache written by the cache_teacher stage; "
            f"re-run that stage"
        )
    if cache.get("teacher_sha256") != teacher_sha256:
        raise UserError(
            f"{path}: cached outputs are from another teacher checkpoint "
            f"({str(cache.get('teacher_sha256'))[:12]} != {teacher_sha256[:12]}); "
            f"re-run the cache_teacher stage"
        )
    if cache.get("n_images") != n_images:
        raise UserError(
            f"{path}: cache holds {cache.get('n_images')} images, the training split "
            f"has {n_images}; re-run the cache_teacher stage"
        )
    missing = sorted({"logits", *(f"layer{k}" for k in stages)} - set(cache["outputs"]))
    if missing:
        raise UserError(
            f"{path}: cache lacks {missing} (distill.feature_stages changed?); "
            f"re-run the cache_teacher stage"
        )
    return cache["outputs"]


class StudentWithProjectors(nn.Module):
    """The student plus 1x1-conv projectors to the teacher's channel counts (training only).

    `forward` is the student's, so evaluation and export see the plain student; the projectors
    sit here so the shared loop's optimizer trains them too. The loss calls
    `forward(x, with_features=True)`: under DDP every trained weight must be used inside the
    wrapped model's forward (DDP prepares its gradient averaging there).
    """

    def __init__(self, student: nn.Module, projections: dict[str, tuple[int, int]]):
        super().__init__()
        self.student = student
        self.projectors = nn.ModuleDict(
            {
                name: nn.Conv2d(c_student, c_teacher, kernel_size=1, bias=False)
                for name, (c_student, c_teacher) in projections.items()
            }
        )

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Logits; with_features: (logits, {"layer<k>": projected stage-k output})."""
        if not with_features:
            return self.student(x)
        stage_outputs = self.student.forward_features(x)
        logits = self.student.forward_head(stage_outputs[-1])
        projected = {
            name: projector(stage_outputs[int(name.removeprefix("layer")) - 1])
            for name, projector in self.projectors.items()
        }
        return logits, projected


def stage_channels(
    model: nn.Module, image_size: int, stages: list[int], *, who: str = "model"
) -> dict[str, int]:
    with torch.no_grad():
        outputs = model.eval().forward_features(torch.zeros(1, 3, image_size, image_size))
    check_feature_stages(stages, len(outputs), who=who)
    return {f"layer{k}": outputs[k - 1].shape[1] for k in stages}


def distillation_loss(
    *,
    alpha: float,
    temperature: float,
    feature_weight: float,
    teacher: nn.Module | None = None,
    stages: list[int] = (),
):
    """A loss for the shared loop. Targets are (labels, teacher_logits, *teacher_features) from
    the cache, or just labels when `teacher` is given (run on each batch: exact under augmentation).
    """

    def loss_fn(model: StudentWithProjectors, images: torch.Tensor, targets):
        if teacher is not None:
            labels = targets[0] if isinstance(targets, tuple) else targets
            cached = teacher_outputs(teacher, images, stages=list(stages), batch_size=len(images))
            t_logits, t_features = cached["logits"], [cached[f"layer{k}"] for k in stages]
        else:
            labels, t_logits, *t_features = targets
        logits, s_projected = model(images, with_features=True)
        loss = engine.kd_logit_loss(logits, t_logits, labels, alpha=alpha, temperature=temperature)
        if feature_weight > 0:
            for k, t_feature in zip(stages, t_features, strict=True):
                projected = s_projected[f"layer{k}"]
                if projected.shape[-1] != t_feature.shape[-1]:  # stems may differ in stride
                    projected = F.adaptive_avg_pool2d(projected, t_feature.shape[-2:])
                loss = loss + feature_weight * F.mse_loss(projected, t_feature)
        return loss, logits

    return loss_fn


def train_student(
    initial: nn.Module,
    loss_fn,
    train_targets: tuple,
    *,
    prepared_dir: str | Path,
    meta: dict,
    params,
    device: torch.device,
    desc: str,
    live_dir: str | Path,
    projections: dict[str, tuple[int, int]],
) -> tuple[nn.Module, float]:
    """Train a copy of `initial` (plus projectors) with the shared loop on this process's shard of
    the training split; (the plain CPU student, its test top-1)."""
    p, base = params.distill, params.base
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
    params,
    device: torch.device,
) -> tuple[nn.Module, dict, dict]:
    """The distill_student stage's work: (student, its architecture record, metrics).

    The student learns from the teacher (cached outputs, or the teacher run on each batch) and,
    with distill.train_baseline, the same student trains without it to measure what KD adds.
    Every process returns the same; the caller writes on rank 0. Warnings print on rank 0.
    """
    from resnet_slim.compress.export import count_macs_params  # onnx: only when counting
    from resnet_slim.train.model_import import import_model, untracked_note
    from resnet_slim.train.models import build_model, load_model, make_arch

    p, base, stages = params.distill, params.base, params.distill.stages_in_use
    threads = distributed.threads_per_process(base.threads)
    main_process = distributed.is_main_process()
    meta = data.load_meta(prepared_dir)
    labels = data.load_split(prepared_dir, "train").labels
    num_classes, size = len(meta["class_names"]), meta["image_size"]
    teacher, _ = load_model(teacher_path, num_classes=num_classes)
    origin = None
    # the student's initial weights: the same seed on every rank, so every rank builds the same
    # student (and evaluates the same one as imported); DDP then starts from rank 0's anyway
    engine.seed_everything(base.seed, threads)
    if p.student.init is None:
        arch = make_arch(
            name=p.student.arch,
            num_classes=num_classes,
            width=p.student.width,
            small_input=p.student.small_input,
        )
        initial = build_model(arch)
    else:
        initial, arch, origin = import_model(
            p.student.init,
            p.student.format,
            num_classes=num_classes,
            replace_head=p.student.replace_head,
            key="distill.student",
        )
        if (note := untracked_note(origin)) and main_process:
            print(f"distill_student: warning: {note}", file=sys.stderr, flush=True)
    teacher_macs, teacher_params = count_macs_params(teacher, size)
    student_params = count_macs_params(initial, size)[1]
    teacher_channels = stage_channels(teacher, size, stages, who="teacher")
    student_channels = stage_channels(initial, size, stages, who="student")
    projections = (
        {k: (student_channels[k], teacher_channels[k]) for k in teacher_channels}
        if p.feature_weight > 0
        else {}
    )

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
    else:
        targets = (labels,)
        # run on every batch, on the student's device; not trained, so no DDP
        loss_fn = distillation_loss(
            alpha=p.alpha,
            temperature=p.temperature,
            feature_weight=p.feature_weight,
            teacher=teacher.to(device).eval(),
            stages=stages,
        )
    # warned only now that every input is known good, so an input error stays one stderr line
    if student_params > teacher_params and main_process:
        print(
            f"distill_student: warning: the student ({student_params:,} parameters) is larger "
            f"than the teacher ({teacher_params:,}); distilling into it will not compress",
            file=sys.stderr,
        )
    common = dict(prepared_dir=prepared_dir, meta=meta, params=params, device=device)
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
    metrics = {
        "student_top1_kd": kd_top1,
        "alpha": p.alpha,
        "temperature": p.temperature,
        "feature_weight": p.feature_weight,
        "cache_teacher": p.cache_teacher,
    }
    if p.train_baseline:
        engine.seed_everything(base.seed, threads)
        baseline, metrics["student_top1_no_kd"] = train_student(
            initial,
            engine.cross_entropy(p.label_smoothing),
            (labels,),
            desc="student without teacher",
            live_dir=f"{reports}/no_kd",
            projections={},
            **common,
        )
        metrics["kd_gain_pp"] = kd_top1 - metrics["student_top1_no_kd"]
        if main_process:  # paired over the same test images: is the gain more than noise?
            gain = stats.paired_drop(
                correct_on_test(student, prepared_dir, meta),
                correct_on_test(baseline, prepared_dir, meta),
            )
            metrics["kd_gain_ci_pp"] = [gain["ci_low"], gain["ci_high"]]
            metrics["kd_mcnemar_p"] = gain["mcnemar"]["p_value"]
    if origin is not None:
        test_loader = engine.eval_loader(prepared_dir, "test", meta)
        origin["top1_as_imported"] = engine.evaluate(initial, test_loader)["top1"]
        metrics["student_origin"] = origin
    macs, n_params = count_macs_params(student, size)
    metrics.update(
        macs=macs,
        params=n_params,
        macs_vs_teacher=macs / teacher_macs,
        params_vs_teacher=n_params / teacher_params,
    )
    return student, arch, metrics
