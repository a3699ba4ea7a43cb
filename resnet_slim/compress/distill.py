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

The distill_student stage's work (the student built, trained with and without the teacher, and
measured) is `student.distill_student`.
"""

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from resnet_slim.checkpoints import safe_torch_load
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
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
