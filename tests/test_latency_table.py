"""The latency model: a model read as units, its latency predicted from a measured table (and that
prediction checked against a whole model's measured time on small models), the table's cache, the
benchmark's prediction check, and the slim_prune stage pruning to a latency budget."""

import copy
import json

import pytest
import torch
import yaml
from torch import nn

from resnet_slim.checkpoints import load_checkpoint, save_checkpoint
from resnet_slim.compress import depth
from resnet_slim.compress.channel_removal import narrow_blocks
from resnet_slim.compress.latency_model import model_units, predict_ms, table_units_for, unit_key
from resnet_slim.compress.latency_prune import block_widths
from resnet_slim.errors import UserError
from resnet_slim.measure import latency_table as lt
from resnet_slim.measure.latency_check import check_predictions
from resnet_slim.train.models import build_model, make_arch
from tests.conftest import REPO, write_params

QUICK = {"warmup": 2, "runs": 3, "repeats": 2, "passes": 1}  # settings, not a measurement


def cifar_resnet20(width: int = 16, seed: int = 0) -> tuple[nn.Module, dict]:
    arch = make_arch(name="cifar_resnet", num_classes=10, depth=20, width=width)
    torch.manual_seed(seed)
    return build_model(arch, image_size=8).eval(), arch


def fake_table(specs: list[dict]) -> dict:
    """Every unit costs its block index + 1 ms in INT8, twice that in FP32; constant 0.5 / 1."""
    units = {}
    for cost, spec in enumerate(specs, start=1):
        plain = {k: v for k, v in spec.items() if k != "name"}
        units[unit_key(plain)] = {"spec": plain, "int8_ms": cost, "fp32_ms": 2 * cost}
    return {"units": units, "constant_ms": {"int8": 0.5, "fp32": 1.0}}


def test_units_follow_removed_blocks_and_narrowed_widths():
    model, arch = cifar_resnet20()
    units = model_units(model, 8)
    assert [u["kind"] for u in units] == ["stem"] + ["basic"] * 9 + ["head"]
    assert [u["size"] for u in units[1:10]] == [8, 8, 8, 8, 4, 4, 4, 2, 2]
    shallow, _ = depth.remove_blocks(model, arch, ["layer1.1", "layer3.2"])
    narrowed = narrow_blocks(shallow, {"layer2.1": 16}, image_size=8)
    blocks = [u for u in model_units(narrowed, 8) if u["kind"] == "basic"]
    assert [b["name"] for b in blocks] == [
        f"layer{s}.{i}" for s, n in ((1, 2), (2, 3), (3, 2)) for i in range(n)
    ]
    assert next(b for b in blocks if b["name"] == "layer2.1")["mid"] == 16
    # equal blocks of different models share one table row: the key never names the module
    assert unit_key(blocks[0]) == unit_key(units[1]) and "layer" not in unit_key(blocks[0])


def test_prediction_is_the_sum_of_its_units_plus_the_constant():
    model, _ = cifar_resnet20()
    units = model_units(model, 8)
    table = fake_table(units)
    # blocks of one stage with equal shapes share a row (the later duplicate's cost wins)
    expected = 0.5 + sum(table["units"][unit_key(u)]["int8_ms"] for u in units)
    assert predict_ms(units, table, "int8") == pytest.approx(expected)
    assert predict_ms(units, table, "fp32") == pytest.approx(2 * expected)
    with pytest.raises(UserError, match="latency runtime must be one of"):
        predict_ms(units, table, "fp16")


def test_a_unit_missing_from_the_table_is_a_one_line_error():
    model, _ = cifar_resnet20()
    table = fake_table(model_units(model, 8))
    narrowed = narrow_blocks(model, {"layer3.0": 16}, image_size=8)
    with pytest.raises(UserError, match="latency table has no unit .*re-run the latency_table"):
        predict_ms(model_units(narrowed, 8), table, "int8")


def test_the_table_lists_every_width_the_pruner_may_choose():
    model, _ = cifar_resnet20()
    specs = table_units_for(model, 8, lambda spec: block_widths(spec, steps=3))
    keys = {unit_key(s) for s in specs}
    assert len(keys) == len(specs)  # deduplicated
    for spec in model_units(model, 8):
        if spec["kind"] == "basic":
            for width in block_widths(spec, steps=3):
                assert unit_key({**spec, "mid": width}) in keys


def test_a_measured_table_predicts_small_models(one_thread):
    """The table prices units in isolation; summed they must give a whole model's time. A loose
    bound (the benchmark reports the real error, here 1-6 %): a unit priced at the session or
    quantization overhead instead of its in-model cost is off by far more."""
    model, arch = cifar_resnet20(width=32)
    specs = table_units_for(model, 16, lambda spec: block_widths(spec, steps=2))
    table = lt.measure_latency_table(specs, **QUICK | {"repeats": 3, "passes": 2})
    shallow, _ = depth.remove_blocks(model, arch, ["layer1.1", "layer2.2", "layer3.1"])
    variants = {
        "whole": model,
        "narrowed": narrow_blocks(model, {"layer2.0": 16, "layer3.1": 16}, image_size=16),
        "shallow": shallow,
    }
    for name, variant in variants.items():
        for runtime in ("fp32", "int8"):
            predicted = predict_ms(model_units(variant, 16), table, runtime)
            measured = lt.measure_model_ms(variant, 16, runtime=runtime, runs=20, repeats=5)
            assert abs(predicted / measured - 1) < 0.3, (name, runtime, predicted, measured)
    assert table["fingerprint"]["onnxruntime"] and table["method"]["passes"] == 2


def test_the_cache_reuses_timings_and_a_corrupt_one_is_ignored(tmp_path, monkeypatch, capsys):
    model, _ = cifar_resnet20(width=16)
    specs = model_units(model, 8)
    first = lt.measure_latency_table(specs, cache_dir=tmp_path, **QUICK)
    (cache,) = tmp_path.iterdir()

    def no_timing(todo, bench, passes):
        assert not todo, f"cached units re-timed: {list(todo)}"
        return {}

    monkeypatch.setattr(lt, "measure_units", no_timing)
    again = lt.measure_latency_table(specs, cache_dir=tmp_path, **QUICK)
    assert again["units"] == first["units"]

    cache.write_text("{not json")
    monkeypatch.undo()
    lt.measure_latency_table(specs, cache_dir=tmp_path, **QUICK)
    assert "ignored, re-measuring" in capsys.readouterr().err
    assert json.loads(cache.read_text())["units"].keys() == first["units"].keys()


def test_benchmark_rows_get_predictions_and_unknown_structures_are_named(tmp_path):
    model, arch = cifar_resnet20()
    save_checkpoint(tmp_path / "teacher.pt", model=model, arch=arch, params={}, metrics={})
    table = fake_table(model_units(model, 8))
    predicted = predict_ms(model_units(model, 8), table, "int8")
    rows = {
        "teacher_qat_int8": {"p50_ms": predicted * 1.1},
        "teacher": {"p50_ms": 100.0},
        "student_qat_int8": {"p50_ms": 1.0},  # no models/student.pt: not predicted
    }
    summary = check_predictions(rows, tmp_path, table, image_size=8)
    assert rows["teacher_qat_int8"]["prediction_error"] == pytest.approx(1 / 1.1 - 1)
    assert summary["errors"].keys() == {"teacher_qat_int8", "teacher"}
    assert summary["max_abs_error"] == pytest.approx(abs(rows["teacher"]["prediction_error"]))
    assert not summary["all_within"] and "predicted_ms" not in rows["student_qat_int8"]
    assert summary["host_drift"] is None  # the table did not time the whole teacher


def test_benchmark_flags_a_table_timed_on_another_host(tmp_path):
    model, arch = cifar_resnet20()
    save_checkpoint(tmp_path / "teacher.pt", model=model, arch=arch, params={}, metrics={})
    table = {**fake_table(model_units(model, 8)), "teacher_measured_ms": {"fp32": 2.0, "int8": 1.0}}
    rows = {"teacher": {"p50_ms": 2.1}, "teacher_ptq_int8": {"p50_ms": 0.95}}
    summary = check_predictions(rows, tmp_path, table, image_size=8)
    assert summary["host_drift"] == pytest.approx({"fp32": 0.05, "int8": -0.05})
    assert summary["host_drift_within"] is True
    rows = {"teacher": {"p50_ms": 2.1}, "teacher_qat_int8": {"p50_ms": 1.3}}  # 30 % slower
    summary = check_predictions(rows, tmp_path, table, image_size=8)
    assert summary["host_drift"]["int8"] == pytest.approx(0.3)
    assert summary["host_drift_within"] is False


def test_slim_prune_with_method_latency_meets_its_budget(tmp_path, tiny_prepared):
    from stages.latency_table import main as table_main
    from stages.slim_prune import main as prune_main

    model, arch = cifar_resnet20(width=32)
    save_checkpoint(tmp_path / "teacher.pt", model=model, arch=arch, params={}, metrics={})
    tiny_train = {"epochs": 1, "batch_size": 64, "lr": 0.02, "warmup_epochs": 0}
    latency = {"structure": "depth_width", "speedup": 2.0, "width_steps": 2, "cost_images": 40}
    params = write_params(
        tmp_path / "params.yaml",
        base={"threads": 1},
        prune={"method": "latency", "latency": latency, "kd_alpha": 0.5, "finetune": tiny_train},
    )
    common = ["--params", str(params), "--teacher", str(tmp_path / "teacher.pt")]
    table_path = tmp_path / "latency_table.json"
    table_main([*common, "--data", str(tiny_prepared), "--out", str(table_path)])
    reports = tmp_path / "reports"
    prune_main(
        [*common, "--data", str(tiny_prepared), "--out", str(tmp_path / "pruned.pt")]
        + ["--reports", str(reports), "--latency-table", str(table_path)]
    )

    plan = json.loads((reports / "metrics.json").read_text())["latency_plan"]
    assert plan["pruned_predicted_int8_ms"] <= plan["budget_int8_ms"]
    measured = json.loads(table_path.read_text())["teacher_measured_ms"]
    assert plan["budget_int8_ms"] == pytest.approx(measured["fp32"] / 2.0)  # the measured teacher
    checkpoint = load_checkpoint(tmp_path / "pruned.pt")
    pruned = build_model(checkpoint["arch"], image_size=8)
    pruned.load_state_dict(checkpoint["state_dict"])
    table = json.loads(table_path.read_text())
    assert predict_ms(model_units(pruned, 8), table, "int8") == pytest.approx(
        plan["pruned_predicted_int8_ms"]
    )
    assert pruned(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "own_budget, fit_after_epochs",
    [(False, 0), (True, 0), (False, 1)],
    ids=["prune_latency", "student_own", "fit_after_epochs"],
)
def test_distill_fits_the_student_to_the_teachers_budget_and_size(
    tmp_path, tiny_prepared, monkeypatch, own_budget, fit_after_epochs
):
    """The student's budget and size target are prune.latency's, or its own fit_speedup /
    fit_max_params_ratio where set (then prune.latency's other values do not apply to it).
    With fit_after_epochs the fit prices the student as distilled that long, not as imported."""
    from resnet_slim.compress import student as student_module
    from stages.cache_teacher import main as cache_main
    from stages.distill_student import main as distill_main
    from stages.latency_table import main as table_main

    teacher, arch = cifar_resnet20(width=32)
    save_checkpoint(tmp_path / "teacher.pt", model=teacher, arch=arch, params={}, metrics={})
    student, student_arch = cifar_resnet20(width=32, seed=1)  # the teacher's widths: in the table
    save_checkpoint(tmp_path / "init.pt", model=student, arch=student_arch, params={}, metrics={})
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    budget = {"speedup": 2.0, "max_params_ratio": 0.5}
    latency = {
        **defaults["prune"]["latency"],
        "width_steps": 2,
        "cost_images": 40,
        **({"speedup": 1.1, "max_params_ratio": None} if own_budget else budget),
    }
    student_params = {
        **defaults["distill"]["student"],
        "init": str(tmp_path / "init.pt"),
        "format": "resnet_slim",
        "fit_to_budget": True,
        "fit_after_epochs": fit_after_epochs,
    }
    if own_budget:
        student_params |= {"fit_speedup": 2.0, "fit_max_params_ratio": 0.5}
    params = write_params(
        tmp_path / "params.yaml",
        base={"threads": 1},
        prune={"latency": latency},
        distill={
            "student": student_params,
            "epochs": 1,
            "batch_size": 64,
            "warmup_epochs": 0,
            "train_baseline": False,
        },
    )
    common = ["--params", str(params), "--data", str(tiny_prepared)]
    teacher_path, table_path = str(tmp_path / "teacher.pt"), tmp_path / "latency_table.json"
    distill = [
        *common,
        "--teacher",
        teacher_path,
        "--cache",
        str(tmp_path / "cache.pt"),
        "--latency-table",
        str(table_path),
        "--out",
        str(tmp_path / "student.pt"),
        "--reports",
        str(tmp_path / "reports"),
    ]
    cache_main([*common, "--teacher", teacher_path, "--out", str(tmp_path / "cache.pt")])
    with pytest.raises(UserError, match="latency table"):  # no table yet: one line, no student
        distill_main(distill)
    assert not (tmp_path / "student.pt").exists()
    table_main([*common, "--teacher", teacher_path, "--out", str(table_path)])
    priced = []  # the students the fit priced
    fit_to_budget = student_module.prune_on_validation
    monkeypatch.setattr(
        student_module,
        "prune_on_validation",
        lambda model, *a, **k: priced.append(copy.deepcopy(model)) or fit_to_budget(model, *a, **k),
    )
    distill_main(distill)

    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    (priced_student,) = priced
    as_imported = all(
        torch.equal(a, b)
        for a, b in zip(
            priced_student.state_dict().values(), student.state_dict().values(), strict=True
        )
    )
    assert as_imported == (fit_after_epochs == 0)
    assert ("student_top1_before_fit" in metrics) == (fit_after_epochs > 0)
    assert (tmp_path / "reports" / "kd_before_fit").exists() == (fit_after_epochs > 0)
    plan = metrics["latency_plan"]
    measured = json.loads(table_path.read_text())["teacher_measured_ms"]
    assert plan["budget_int8_ms"] == pytest.approx(measured["fp32"] / 2.0)  # the teacher's
    assert plan["speedup"] == 2.0 and plan["max_params"] == int(0.5 * plan["teacher_params"])
    assert plan["pruned_predicted_int8_ms"] <= plan["budget_int8_ms"]
    teacher_count = sum(t.numel() for t in teacher.parameters())
    assert plan["teacher_params"] == teacher_count
    assert plan["pruned_params"] <= int(0.5 * teacher_count)
    checkpoint = load_checkpoint(tmp_path / "student.pt")
    fitted = build_model(checkpoint["arch"], image_size=8)
    fitted.load_state_dict(checkpoint["state_dict"])  # the record describes the fitted student
    assert sum(t.numel() for t in fitted.parameters()) == plan["pruned_params"]
    assert fitted(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
