import math

import pytest
import torch
from torch.nn import functional as F

from resnet_slim.compress import distill
from resnet_slim.compress.distill import (
    StudentWithProjectors,
    distillation_loss,
    load_teacher_cache,
    save_teacher_cache,
    stage_channels,
    teacher_outputs,
)
from resnet_slim.compress.export import export_onnx, make_session
from resnet_slim.errors import UserError
from resnet_slim.io import sha256_file
from resnet_slim.train.engine import kd_logit_loss
from resnet_slim.train.models import build_model, make_arch
from tests.conftest import write_checkpoint


def test_kd_loss_matches_a_hand_computed_value():
    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.7
    ps = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax(s / T)
    pt = [ps[1], ps[0]]  # softmax(t / T)
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    expected = alpha * T**2 * kl + (1 - alpha) * ce
    assert kd_logit_loss(s, t, y, alpha=alpha, temperature=T).item() == pytest.approx(
        expected, rel=1e-6
    )
    # alpha = 0 is plain cross-entropy
    assert kd_logit_loss(s, t, y, alpha=0.0, temperature=T).item() == pytest.approx(
        F.cross_entropy(s, y).item()
    )


@pytest.mark.parametrize(
    "alpha, temperature, message",
    [(1.5, 4.0, "alpha"), (-0.1, 4.0, "alpha"), (0.5, 0.0, "temperature")],
)
def test_bad_alpha_or_temperature_is_a_clear_error(alpha, temperature, message):
    with pytest.raises(UserError, match=message):
        kd_logit_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.tensor([0]),
            alpha=alpha,
            temperature=temperature,
        )


def _models():
    torch.manual_seed(0)
    teacher = build_model(make_arch(name="resnet18", num_classes=10, width=16)).eval()
    student = build_model(make_arch(name="resnet18", num_classes=10, width=8))
    return teacher, student


def test_cached_and_online_teacher_give_the_same_loss():
    teacher, student = _models()
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    projections = {
        "layer4": (
            stage_channels(student, 16, [4])["layer4"],
            stage_channels(teacher, 16, [4])["layer4"],
        )
    }
    model = StudentWithProjectors(student, projections).eval()
    cache = teacher_outputs(teacher, images, stages=[4])
    cached = distillation_loss(alpha=0.7, temperature=4.0, feature_weight=0.5, stages=[4])
    online = distillation_loss(
        alpha=0.7, temperature=4.0, feature_weight=0.5, stages=[4], teacher=teacher
    )
    loss_cached, logits = cached(model, images, (labels, cache["logits"], cache["layer4"]))
    loss_online, _ = online(model, images, labels)
    assert loss_cached.item() == pytest.approx(loss_online.item(), rel=1e-5)
    assert torch.equal(logits, student(images))
    loss_cached.backward()
    assert (
        model.projectors["layer4"].weight.grad is not None
    )  # the feature term trains the projector


def test_cache_is_refused_for_another_teacher_or_split(tmp_path):
    teacher, _ = _models()
    (tmp_path / "teacher.pt").write_bytes(b"teacher one")
    outputs = teacher_outputs(teacher, torch.randn(4, 3, 16, 16), stages=[4])
    save_teacher_cache(
        tmp_path / "cache.pt",
        outputs,
        teacher_sha256=sha256_file(tmp_path / "teacher.pt"),
        n_images=4,
    )
    loaded = load_teacher_cache(
        tmp_path / "cache.pt", teacher_sha256=sha256_file(tmp_path / "teacher.pt"), n_images=4
    )
    assert torch.equal(loaded["logits"], outputs["logits"])
    with pytest.raises(UserError, match="training split"):
        load_teacher_cache(
            tmp_path / "cache.pt", teacher_sha256=sha256_file(tmp_path / "teacher.pt"), n_images=5
        )
    (tmp_path / "teacher.pt").write_bytes(b"teacher two")  # retrained teacher
    with pytest.raises(UserError, match="another teacher"):
        load_teacher_cache(
            tmp_path / "cache.pt", teacher_sha256=sha256_file(tmp_path / "teacher.pt"), n_images=4
        )


def test_student_exports_without_projectors(tmp_path):
    teacher, student = _models()
    wrapped = StudentWithProjectors(student, {"layer4": (64, 128)})
    export_onnx(wrapped.student, tmp_path / "s.onnx", image_size=16, opset=17)
    out = make_session(tmp_path / "s.onnx").run(None, {"input": torch.zeros(1, 3, 16, 16).numpy()})[
        0
    ]
    assert out.shape == (1, 10)


def test_mobilenet_student_distils_and_exports(tmp_path):
    teacher, _ = _models()
    student = build_model(
        make_arch(name="mobilenet_v3_small", num_classes=10, width=16, small_input=True)
    )
    stages = [3, 4]
    s_ch, t_ch = stage_channels(student, 16, stages), stage_channels(teacher, 16, stages)
    assert s_ch == {"layer3": 48, "layer4": 576}
    model = StudentWithProjectors(student, {k: (s_ch[k], t_ch[k]) for k in s_ch}).train()
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    cache = teacher_outputs(teacher, images, stages=stages)
    loss, logits = distillation_loss(alpha=0.7, temperature=4.0, feature_weight=1.0, stages=stages)(
        model, images, (labels, cache["logits"], cache["layer3"], cache["layer4"])
    )
    loss.backward()
    assert logits.shape == (4, 10) and torch.isfinite(loss)
    export_onnx(student.eval(), tmp_path / "m.onnx", image_size=16, opset=17)
    out = make_session(tmp_path / "m.onnx").run(None, {"input": images.numpy()})[0]
    assert abs(out - student(images).detach().numpy()).max() < 1e-4


def test_teacher_cache_problems(tmp_path, tiny_model):
    write_checkpoint(tmp_path / "teacher.pt")
    sha = sha256_file(tmp_path / "teacher.pt")
    torch.save(tiny_model, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="pickled.pt: not a loadable teacher-output cache .refused"):
        distill.load_teacher_cache(tmp_path / "pickled.pt", teacher_sha256=sha, n_images=4)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a teacher-output cache written by the cache_teacher"):
        distill.load_teacher_cache(tmp_path / "list.pt", teacher_sha256=sha, n_images=4)
    distill.save_teacher_cache(
        tmp_path / "cache.pt", {"logits": torch.zeros(4, 10)}, teacher_sha256=sha, n_images=4
    )
    with pytest.raises(
        UserError, match="cache lacks \\['layer3'\\] .distill.feature_stages changed"
    ):
        distill.load_teacher_cache(
            tmp_path / "cache.pt", teacher_sha256=sha, n_images=4, stages=[3]
        )
