"""SVD low-rank factorization: exact at full rank, meets a parameter budget, rebuilds from its
architecture record, exports to ONNX, and the stage compares it with the pruned model."""

import json

import numpy as np
import pytest
import torch
from conftest import write_params
from torch import nn

from resnet_slim.checkpoints import load_checkpoint, save_checkpoint
from resnet_slim.compress import lowrank, prune
from resnet_slim.compress.export import export_onnx, make_session, run_onnx
from resnet_slim.errors import UserError
from resnet_slim.train.models import build_model, make_arch


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def full_ranks(model: nn.Module) -> dict[str, int]:
    return {
        name: min(m.weight.shape[0], m.weight[0].numel())
        for name, m in lowrank.factorizable_layers(model).items()
    }


def test_full_rank_factorization_reproduces_the_outputs(tiny_model):
    x = torch.randn(4, 3, 16, 16)
    before = tiny_model(x)
    factorized = lowrank.factorize_svd(tiny_model, full_ranks(tiny_model)).eval()
    assert isinstance(factorized.layer1[0].conv1, nn.Sequential)
    assert isinstance(factorized.conv1, nn.Conv2d)  # the RGB stem is left alone
    torch.testing.assert_close(factorized(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_ranks_meet_the_parameter_budget_in_multiples_of_round_to(tiny_model, ratio):
    total = n_params(tiny_model)
    ranks = lowrank.choose_ranks(tiny_model, params_ratio=ratio, round_to=4)
    assert ranks and all(r % 4 == 0 or r == full_ranks(tiny_model)[n] for n, r in ranks.items())
    predicted = lowrank.params_with_ranks(tiny_model, ranks)
    assert predicted <= ratio * total
    factorized = lowrank.factorize_svd(tiny_model, ranks)
    assert n_params(factorized) == predicted


def test_more_budget_keeps_more_rank(tiny_model):
    small = lowrank.choose_ranks(tiny_model, params_ratio=0.3, round_to=2)
    large = lowrank.choose_ranks(tiny_model, params_ratio=0.7, round_to=2)
    assert sum(large.values()) > sum(small.values())


@pytest.mark.parametrize(
    "ratio, message", [(0.0, r"in \(0, 1\)"), (1.5, r"in \(0, 1\)"), (0.01, "out of reach")]
)
def test_impossible_budgets_are_one_line_errors(tiny_model, ratio, message):
    with pytest.raises(UserError, match=message):
        lowrank.choose_ranks(tiny_model, params_ratio=ratio, round_to=8)


@pytest.mark.parametrize(
    "ranks, message",
    [
        ({"layer1.0.conv1": 100}, "rank 1..8"),
        ({"layer1.0.bn1": 4}, "plain convs"),
        ({"layer9": 4}, "no layer 'layer9'"),
    ],
)
def test_factorize_refuses_what_it_cannot_split(tiny_model, ranks, message):
    with pytest.raises(UserError, match=message):
        lowrank.factorize_svd(tiny_model, ranks)


def test_linear_layers_split_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    x = torch.randn(3, 12)
    before = model(x)
    lowrank.factorize_svd(model, {"0": 10})
    assert [m.out_features for m in model[0]] == [10, 10] and model[0][0].bias is None
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_the_checkpoint_rebuilds_and_exports(tmp_path, tiny_model):
    ranks = lowrank.choose_ranks(tiny_model, params_ratio=0.5, round_to=4)
    model = lowrank.factorize_svd(tiny_model, ranks).eval()
    arch = {**make_arch(name="resnet18", num_classes=10, width=8), "lowrank": ranks}
    save_checkpoint(tmp_path / "m.pt", model=model, arch=arch, params={}, metrics={})
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    rebuilt = build_model(checkpoint["arch"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rebuilt.eval()(x), model(x))
    export_onnx(rebuilt, tmp_path / "m.onnx", image_size=16, opset=17)
    onnx_logits = run_onnx(make_session(tmp_path / "m.onnx"), x)
    np.testing.assert_allclose(onnx_logits, model(x).detach().numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "ranks",
    [
        {"layer1.0.nope": 4},
        {"layer1.0.bn1": 4},
        {"layer1.0.conv1": 0},
        {"layer1.0.conv1": 2.5},
        {"layer1.0.conv1": "4"},
        ["layer1.0.conv1"],
    ],
)
def test_a_bad_lowrank_record_is_a_user_error(ranks):
    arch = {**make_arch(name="resnet18", num_classes=10, width=8), "lowrank": ranks}
    with pytest.raises(UserError, match="bad architecture record"):
        build_model(arch)


def test_stage_matches_the_pruned_size_and_writes_a_reloadable_checkpoint(tmp_path, tiny_prepared):
    from stages.lowrank import main

    torch.manual_seed(0)
    arch = make_arch(name="resnet18", num_classes=10, width=8)
    teacher = build_model(arch)
    save_checkpoint(tmp_path / "teacher.pt", model=teacher, arch=arch, params={}, metrics={})
    pruned_arch = make_arch(
        name="resnet18", num_classes=10, width=4
    )  # stands in for a pruned model
    save_checkpoint(
        tmp_path / "pruned.pt",
        model=build_model(pruned_arch),
        arch=pruned_arch,
        params={},
        metrics={},
    )
    params = write_params(
        tmp_path / "params.yaml",
        base={"threads": 1},
        teacher={"width": 8},
        lowrank={"round_to": 2, "finetune": {"epochs": 1, "lr": 0.02}},
    )
    reports = tmp_path / "reports"
    main(
        [
            "--params",
            str(params),
            "--teacher",
            str(tmp_path / "teacher.pt"),
            "--pruned",
            str(tmp_path / "pruned.pt"),
            "--data",
            str(tiny_prepared),
            "--out",
            str(tmp_path / "lowrank.pt"),
            "--reports",
            str(reports),
        ]
    )
    metrics = json.loads((reports / "metrics.json").read_text())
    # non-zero weights (also right for unstructured pruning); fresh BN biases are zeros
    target = prune.count_nonzero(build_model(pruned_arch)) / prune.count_nonzero(teacher)
    assert metrics["params_ratio_target"] == pytest.approx(target)
    assert metrics["params"]["lowrank"] <= target * metrics["params"]["teacher"]
    assert metrics["params"]["pruned"] == n_params(build_model(pruned_arch))
    assert set(metrics["top1_test"]) == {"before", "after_factorization", "after_finetune"}
    assert (reports / "finetune").is_dir()
    checkpoint = load_checkpoint(tmp_path / "lowrank.pt")
    assert checkpoint["arch"]["lowrank"] == metrics["ranks"]
    model = build_model(checkpoint["arch"])
    model.load_state_dict(checkpoint["state_dict"])
    assert n_params(model) == metrics["params"]["lowrank"]


def test_params_reject_a_bad_ratio(tmp_path):
    from resnet_slim.params import load_params

    for bad in (0, 1.2, "half"):
        path = write_params(tmp_path / "p.yaml", lowrank={"params_ratio": bad})
        with pytest.raises(UserError, match="lowrank.params_ratio"):
            load_params(path)


def test_report_section_compares_with_pruning_from_the_numbers():
    from resnet_slim.report.methods import lowrank_vs_pruning

    assert lowrank_vs_pruning(None, {}, {}) == []  # runs from before the stage
    metrics = {
        "params_ratio_target": 0.5,
        "round_to": 16,
        "params": {"teacher": 100, "lowrank": 49, "pruned": 50},
        "macs": {"teacher": 1000, "lowrank": 600, "pruned": 500},
        "top1_test": {"before": 90.0, "after_factorization": 60.0, "after_finetune": 89.0},
    }
    models = {
        "pruned": {"top1": 88.0, "p50_ms": 2.0, "size_mb": 1.0},
        "lowrank": {"top1": 89.0, "p50_ms": 3.0, "size_mb": 1.0},
    }
    blocks = lowrank_vs_pruning(metrics, {"top1_test": {"after_finetune": 88.0}}, models)
    table = next(b[1] for b in blocks if b[0] == "table")
    assert list(table["model"]) == ["pruned FP32", "low-rank FP32"]  # INT8 rows only if benchmarked
    assert list(table["params"]) == [50, 49]
    text = " ".join(b[1] for b in blocks if b[0] == "p")
    assert "neither wins outright: low-rank is more accurate, pruned is faster" in text
    assert (
        "2.000 ms pruned vs 3.000 ms low-rank, top-1 +1.00 pp" in text and "second operator" in text
    )
    models["lowrank"]["p50_ms"] = 1.0
    text = " ".join(b[1] for b in lowrank_vs_pruning(metrics, {}, models) if b[0] == "p")
    assert "low-rank wins:" in text and "second operator" not in text


def test_report_section_lists_int8_rows_and_falls_back_to_the_prune_counts():
    from resnet_slim.report.methods import lowrank_vs_pruning

    metrics = {
        "params_ratio_target": 0.3,
        "round_to": 16,
        "params": {"teacher": 100, "lowrank": 30},
        "macs": {"teacher": 1000, "lowrank": 400},
        "top1_test": {"after_finetune": 80.0},
    }
    prune_metrics = {
        "params": {"pruned": 28},
        "macs": {"pruned": 450},
        "top1_test": {"after_finetune": 85.0},
    }
    row = {"top1": 84.0, "p50_ms": 1.0, "size_mb": 0.5}
    models = {
        name: dict(row)
        for name in ("pruned", "pruned_qat_int8", "pruned_ptq_int8", "lowrank", "lowrank_ptq_int8")
    }
    models["lowrank"]["top1"] = 80.0
    blocks = lowrank_vs_pruning(metrics, prune_metrics, models)
    table = next(b[1] for b in blocks if b[0] == "table")
    assert list(table["model"]) == [
        "pruned FP32",
        "pruned INT8 (QAT)",
        "pruned INT8 (PTQ)",
        "low-rank FP32",
        "low-rank INT8 (PTQ)",
    ]
    assert list(table["params"]) == [28, 28, 28, 30, 30] and list(table["MACs"])[0] == 450
    text = " ".join(b[1] for b in blocks if b[0] == "p")
    assert (
        "At 28 vs 30 parameters (pruned vs low-rank), pruned wins:" in text
    )  # same p50, better top-1
    models["lowrank"]["top1"] = 84.0
    text = " ".join(b[1] for b in lowrank_vs_pruning(metrics, prune_metrics, models) if b[0] == "p")
    assert "neither wins: they tie" in text
