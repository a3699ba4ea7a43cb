"""Resumable training (resnet_slim/train/resume.py): a stopped fit continues after its last finished
epoch with the same result, and only a checkpoint of the same work is ever loaded."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_slim.data.loader import train_val_loaders
from resnet_slim.params import Augment, TrainParams
from resnet_slim.train import engine, resume
from resnet_slim.train.models import build_model, make_arch
from tests.conftest import prepared_digits, write_params

SECTIONS = {"base": {"seed": 0}, "teacher": {"lr": 0.05}}


class Stop(KeyboardInterrupt):
    """What SIGTERM raises in a stage (errors.run_stage), at a chosen epoch start."""


def run_fit(
    prepared,
    workdir,
    *,
    epochs=3,
    stop_at=None,
    sections=SECTIONS,
    channels_last=True,
    lr=0.05,
    seed=0,
):
    """Seed, build, fit inside a resume session as a stage does; (state_dict, history)."""
    engine.seed_everything(seed, 1)
    train, val, _ = train_val_loaders(
        prepared, batch_size=16, augment=Augment(crop_padding=1, hflip=True), seed=seed
    )
    model = build_model(make_arch(name="resnet18", num_classes=10, width=8))

    def stop(model, epoch):
        if epoch == stop_at:
            raise Stop

    with resume.checkpoints(workdir / "models" / "teacher.pt", sections):
        history = engine.fit(
            model,
            train,
            val,
            TrainParams(epochs=epochs, lr=lr, batch_size=16, warmup_epochs=0.5),
            loss_fn=engine.cross_entropy(0.1),
            live_dir=workdir / "live",
            desc="teacher",
            on_epoch_start=stop,
            channels_last=channels_last,
        )
        if stop_at == "end":  # the phase finished; the stage had not written its outputs yet
            raise Stop
    return model.state_dict(), history


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def checkpoint_file(workdir):
    return workdir / "models" / ".resume" / "teacher.pt" / "teacher-rank0.pt"


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("stop_at", [1, 2])
def test_a_stopped_fit_resumes_to_byte_identical_weights_and_history(
    tiny_prepared, tmp_path, one_thread, stop_at, channels_last
):
    whole, whole_history = run_fit(tiny_prepared, tmp_path / "a", channels_last=channels_last)
    with pytest.raises(Stop):
        run_fit(tiny_prepared, tmp_path / "b", stop_at=stop_at, channels_last=channels_last)
    assert checkpoint_file(tmp_path / "b").is_file()
    resumed, resumed_history = run_fit(tiny_prepared, tmp_path / "b", channels_last=channels_last)
    assert_same_weights(whole, resumed)
    assert resumed_history == whole_history
    assert not (tmp_path / "b" / "models" / ".resume").exists()  # done: removed
    # the curves continue: every epoch once, in order
    rows = (tmp_path / "b" / "live" / "plots" / "metrics" / "val_top1.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in rows] == ["step", "0", "1", "2"]
    for curve in ("metrics.json", "plots/metrics/val_top1.tsv", "plots/metrics/lr.tsv"):
        assert (tmp_path / "b" / "live" / curve).read_text() == (
            tmp_path / "a" / "live" / curve
        ).read_text()
    assert json.loads((tmp_path / "b" / "live" / "metrics.json").read_text())["step"] == 2


def test_resuming_prints_where_it_continues(tiny_prepared, tmp_path, one_thread, capsys):
    with pytest.raises(Stop):
        run_fit(tiny_prepared, tmp_path, stop_at=2)
    run_fit(tiny_prepared, tmp_path)
    assert (
        f"teacher: resumed after epoch 2 from {checkpoint_file(tmp_path)}"
        in capsys.readouterr().out
    )


def test_a_finished_phase_is_not_trained_again(tiny_prepared, tmp_path, one_thread, monkeypatch):
    """A stage stopped after its first phase (slim_prune's sparsity training, say) re-runs that
    phase as a load, not as training."""
    whole, history = run_fit(tiny_prepared, tmp_path / "a")
    with pytest.raises(Stop):
        run_fit(tiny_prepared, tmp_path / "b", stop_at="end")
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("trained again"))
    resumed, resumed_history = run_fit(tiny_prepared, tmp_path / "b")
    assert_same_weights(whole, resumed)
    assert resumed_history == history


@pytest.mark.parametrize(
    "change, cause",
    [
        (
            {"sections": {"base": {"seed": 0}, "teacher": {"lr": 0.1}}},
            "params changed (teacher.lr)",
        ),
        ({"lr": 0.01}, "params changed"),  # TrainParams are the stage's section: see below
        ({"seed": 1}, "starts from changed"),
    ],
)
def test_a_checkpoint_of_other_work_is_discarded_with_its_cause(
    tiny_prepared, tmp_path, one_thread, capsys, change, cause
):
    with pytest.raises(Stop):
        run_fit(tiny_prepared, tmp_path, stop_at=1)
    capsys.readouterr()
    if "lr" in change:  # a stage's section holds the phase's params: change both, as a stage does
        change = {**change, "sections": {"base": {"seed": 0}, "teacher": {"lr": change["lr"]}}}
    _, history = run_fit(tiny_prepared, tmp_path, **change)
    err = capsys.readouterr().err
    assert f"teacher: not resuming from {checkpoint_file(tmp_path)}: " in err and cause in err
    assert len(err.strip().splitlines()) == 1
    assert len(history) == 3


def test_changed_code_data_and_start_are_named(tiny_prepared, tmp_path, one_thread):
    engine.seed_everything(0, 1)
    train, val, _ = train_val_loaders(tiny_prepared, batch_size=16, augment=None, seed=0)
    model = build_model(make_arch(name="resnet18", num_classes=10, width=8))
    session = resume.Session(tmp_path, {"teacher.lr": 0.05})
    key = resume.fit_key(session, desc="teacher", model=model, train_loader=train, val_loader=val)
    assert (
        "resnet_slim/train/engine.py" in key["code"]
        and "resnet_slim/train/resume.py" in key["code"]
    )
    assert resume._key_difference(key, key) is None
    edited = {**key, "code": {**key["code"], "resnet_slim/train/engine.py": "0" * 64}}
    assert resume._key_difference(edited, key) == "code changed (resnet_slim/train/engine.py)"
    assert "data changed" in resume._key_difference({**key, "data": "x"}, key)
    assert "starts from changed" in resume._key_difference({**key, "start": "x"}, key)
    assert "2 process(es)" in resume._key_difference({**key, "world_size": 2}, key)
    # a different model to start from is a different start
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    other = resume.fit_key(session, desc="teacher", model=model, train_loader=train, val_loader=val)
    assert other["start"] != key["start"] and other["data"] == key["data"]


@pytest.mark.parametrize(
    "damage, cause",
    [
        (lambda blob: blob[: len(blob) // 2], "sha256 does not match"),
        (lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]), "sha256 does not match"),
        (lambda blob: b"PK\x03\x04" + blob[4:], "not a resume checkpoint"),
        (lambda blob: b"", "not a resume checkpoint"),
    ],
)
def test_a_truncated_or_corrupt_checkpoint_is_refused_in_one_line(
    tiny_prepared, tmp_path, one_thread, capsys, damage, cause
):
    with pytest.raises(Stop):
        run_fit(tiny_prepared, tmp_path, stop_at=2)
    path = checkpoint_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    capsys.readouterr()
    whole, _ = run_fit(tiny_prepared, tmp_path / "fresh")
    resumed, history = run_fit(tiny_prepared, tmp_path)
    err = capsys.readouterr().err
    assert cause in err and len(err.strip().splitlines()) == 1
    assert_same_weights(whole, resumed)  # trained from epoch 1, as if no checkpoint had been
    assert len(history) == 3


def test_a_checkpoint_with_pickled_code_is_never_unpickled(tmp_path):
    import hashlib
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    payload = io.BytesIO()
    torch.save({"key": {}, "x": Evil()}, payload, pickle_module=pickle)
    blob = payload.getvalue()
    path = tmp_path / "teacher-rank0.pt"
    path.write_bytes(resume.FORMAT + hashlib.sha256(blob).hexdigest().encode() + b"\n" + blob)
    checkpoint, why = resume.load(path, {"phase": "teacher"})
    assert checkpoint is None and "cannot be loaded" in why


def test_outside_a_stage_session_fit_writes_no_checkpoint(tiny_prepared, tmp_path, one_thread):
    train, val, _ = train_val_loaders(tiny_prepared, batch_size=32, augment=None, seed=0)
    model = build_model(make_arch(name="resnet18", num_classes=10, width=8))
    engine.fit(
        model,
        train,
        val,
        TrainParams(epochs=1),
        loss_fn=engine.cross_entropy(),
        live_dir=tmp_path / "live",
        desc="teacher",
    )
    assert resume.current() is None
    assert not list(tmp_path.rglob("*.pt"))


# ---------------------------------------------------------------- every training stage, SIGKILLed

TWO_EPOCHS = {"epochs": 2, "batch_size": 16, "lr": 0.02, "warmup_epochs": 0}
DATA = ["--data", "data/prepared"]
# stage: (command after `python -m`, outputs compared byte for byte, which epoch save to kill after:
# counted over the stage's phases, e.g. slim_prune's 3rd is fine-tuning's 1st, after sparsity's 2)
STAGES = {
    "train_teacher": (
        ["stages.train_teacher", *DATA, "--out", "models/teacher.pt", "--live", "reports/teacher"],
        ["models/teacher.pt", "reports/teacher/summary.json"],
        1,
    ),
    "slim_prune": (
        [
            "stages.slim_prune",
            "--teacher",
            "models/teacher.pt",
            *DATA,
            "--out",
            "models/pruned.pt",
            "--reports",
            "reports/prune",
        ],
        ["models/pruned.pt", "reports/prune/metrics.json", "reports/prune/channels.json"],
        3,
    ),
    "cache_teacher": (
        [
            "stages.cache_teacher",
            "--teacher",
            "models/teacher.pt",
            *DATA,
            "--out",
            "models/teacher_outputs.pt",
        ],
        [],
        None,  # no training: nothing to resume
    ),
    "lowrank": (
        [
            "stages.lowrank",
            "--teacher",
            "models/teacher.pt",
            "--pruned",
            "models/pruned.pt",
            *DATA,
            "--out",
            "models/lowrank.pt",
            "--reports",
            "reports/lowrank",
        ],
        ["models/lowrank.pt", "reports/lowrank/metrics.json"],
        1,
    ),
    "distill_student": (
        [
            "stages.distill_student",
            "--teacher",
            "models/teacher.pt",
            "--cache",
            "models/teacher_outputs.pt",
            *DATA,
            "--out",
            "models/student.pt",
            "--reports",
            "reports/distill",
        ],
        ["models/student.pt", "reports/distill/metrics.json"],
        3,  # the no-KD baseline's 1st epoch, after the student's 2
    ),
    "qat": (
        [
            "stages.qat",
            "--checkpoint",
            "models/pruned.pt",
            *DATA,
            "--onnx",
            "models/pruned_qat_int8.onnx",
            "--out",
            "models/pruned_qat.pt",
            "--reports",
            "reports/qat_pruned",
        ],
        ["models/pruned_qat.pt", "models/pruned_qat_int8.onnx", "reports/qat_pruned/metrics.json"],
        1,
    ),
}


def run_stage_command(workdir: Path, name: str, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", *STAGES[name][0], "--params", "params.yaml"]
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """Every training stage run once, uninterrupted, on tiny data (2 epochs per phase)."""
    root = tmp_path_factory.mktemp("resume_whole")
    prepared_digits(root / "data", per_class=12, held_out=0.25)
    write_params(
        root / "params.yaml",
        base={"threads": 1},
        teacher={"width": 8, **TWO_EPOCHS},
        prune={"ratio": 0.3, "round_to": 4, "sparsity": TWO_EPOCHS, "finetune": TWO_EPOCHS},
        lowrank={"finetune": TWO_EPOCHS},
        qat={
            **TWO_EPOCHS,
            "freeze_bn_epoch": 1,
            "freeze_observer_epoch": 1,
            "calibration_images": 32,
            "min_agreement": 0.5,
        },
        distill={**TWO_EPOCHS, "student": {"width": 4}, "train_baseline": True},
    )
    for name in STAGES:
        result = run_stage_command(root, name)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (root / "models" / ".resume").exists()  # every stage removed its checkpoints
    return root


def killed_after_save(workdir: Path, name: str, save: int) -> None:
    """Run the stage; SIGKILL it right after its `save`-th resume checkpoint was written."""
    from tests.test_faults import child_env

    env = child_env(workdir, f"resnet_slim.train.resume:save:{save}:kill:resnet_slim.train.resume")
    result = run_stage_command(workdir, name, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


@pytest.mark.parametrize("name", [n for n, (_, _, save) in STAGES.items() if save])
def test_every_training_stage_killed_mid_run_resumes_to_the_same_outputs(whole_run, tmp_path, name):
    command, outputs, save = STAGES[name]
    workdir = tmp_path / "w"
    shutil.copytree(whole_run, workdir)
    for output in outputs:
        (workdir / output).unlink()
    killed_after_save(workdir, name, save)
    checkpoints = list((workdir / "models" / ".resume").rglob("*.pt"))
    assert checkpoints, "the killed stage left no checkpoint to resume from"
    result = run_stage_command(workdir, name)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed after epoch" in result.stdout
    for output in outputs:
        assert (workdir / output).read_bytes() == (whole_run / output).read_bytes(), output
    assert not (workdir / "models" / ".resume").exists()
