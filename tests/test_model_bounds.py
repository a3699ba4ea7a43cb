"""Inputs that would hang or exhaust memory are refused in one line, before the damage:

* an architecture record whose values pass one by one but add up to a model no machine holds
  (8192 channels in every conv) is refused from the record alone, before anything is built;
* an ONNX file with control flow (Loop, Scan, If; nested in a subgraph or a model-local function)
  is refused before onnxruntime loads it (a Loop of 2**62 iterations never ends);
* non-finite test images (a meta.json std of 0) and a model with NaN logits are not scored.
"""

import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from resnet_slim.compress.export import control_flow_ops, export_onnx, make_session
from resnet_slim.compress.quant import calibration_images, quantize_static_int8
from resnet_slim.data.loader import load_meta, load_split, normalize, normalized_split, to_tensor
from resnet_slim.errors import UserError
from resnet_slim.measure.bench import benchmark_model
from resnet_slim.params import BenchmarkParams
from resnet_slim.train import model_bounds as bounds
from resnet_slim.train import models
from resnet_slim.train.model_bounds import (
    MAX_ACTIVATION_BYTES,
    MAX_PARAMS,
    arch_size,
    check_arch_size,
)
from resnet_slim.train.models import build_model, channel_record, load_model, make_arch
from tests.conftest import REPO, assert_one_line_error, write_params

TINY = make_arch(name="resnet18", num_classes=10, width=8, small_input=True)
CIFAR = make_arch(name="cifar_resnet", depth=20, num_classes=10, width=8)


def _pruned(arch: dict, block: str, keep: int) -> dict:
    """`arch` with the inner channels of one basic block cut to `keep` (a consistent record)."""
    model = build_model(arch)
    record = {
        name: counts
        for name, counts in channel_record(model).items()
        if name.startswith(f"{block}.")
    }
    channels = {
        f"{block}.conv1": [keep, record[f"{block}.conv1"][1]],
        f"{block}.bn1": [keep],
        f"{block}.conv2": [record[f"{block}.conv2"][0], keep],
    }
    return {**arch, "channels": channels}


ARCHS = {
    "resnet18-small": TINY,
    "resnet34-imagenet-stem": make_arch(name="resnet34", num_classes=7, width=8, small_input=False),
    "resnet50-small": make_arch(name="resnet50", num_classes=10, width=8, small_input=True),
    "resnet50-imagenet-stem": make_arch(name="resnet50", num_classes=5, width=8, small_input=False),
    "cifar_resnet20": CIFAR,
    "cifar_resnet32-width16": make_arch(name="cifar_resnet", depth=32, num_classes=3, width=16),
    "mobilenet-small-input": make_arch(name="mobilenet_v3_small", num_classes=10, width=16),
    "mobilenet-half-width-imagenet-stem": make_arch(
        name="mobilenet_v3_small", num_classes=4, width=8, small_input=False
    ),
    "resnet18-pruned": _pruned(TINY, "layer2.1", 5),
    "cifar_resnet20-pruned": _pruned(CIFAR, "layer2.0", 3),
    "resnet18-lowrank": {**TINY, "lowrank": {"layer1.0.conv2": 3, "layer3.1.conv1": 4, "fc": 2}},
    "cifar_resnet20-pruned-lowrank": {
        **_pruned(CIFAR, "layer2.0", 3),
        "lowrank": {"layer2.0.conv1": 2, "linear": 4},
    },
}


def _measured(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    """(parameters, bytes of float32 conv / linear outputs for one image) of a real forward."""
    outputs = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return sum(p.numel() for p in model.parameters()), 4 * sum(outputs)


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
def test_the_size_estimate_is_exactly_what_the_builder_builds(arch):
    model = build_model(arch)
    assert set(bounds._layer_table(arch)) == set(channel_record(model))  # every conv / BN / linear
    for image_size in (8, 19):  # an odd size: every stride-2 layer rounds up
        assert arch_size(arch, image_size) == _measured(model, image_size)


def test_real_models_pass_and_the_design_sizes_are_assumed():
    resnet50 = make_arch(name="resnet50", num_classes=1000, width=64, small_input=False)
    params, activations = arch_size(resnet50)  # at 224 px: the ImageNet stem's design size
    assert params == 25_557_032  # torchvision's resnet50
    assert 30e6 < activations < 100e6
    widest = make_arch(name="resnet50", num_classes=1000, width=bounds.MAX_WIDTH, small_input=False)
    for arch, size in [
        (resnet50, 224),
        (make_arch(name="cifar_resnet", depth=110, num_classes=100, width=16), 32),
        (make_arch(name="resnet18", num_classes=10, width=64, small_input=True), 64),
        (make_arch(name="mobilenet_v3_small", num_classes=1000, width=16, small_input=False), 512),
        (widest, 512),  # the widest model allowed, at the largest images allowed
    ]:
        check_arch_size(arch, image_size=size)
        assert arch_size(arch, size)[0] <= MAX_PARAMS
    assert arch_size(make_arch(name="resnet18", num_classes=10, width=8), None) == arch_size(
        make_arch(name="resnet18", num_classes=10, width=8), 32
    )


def _everywhere(arch: dict, channels: int) -> dict:
    """`arch` with every conv / BN at `channels` (each value within MAX_CHANNELS on its own)."""
    record = {}
    for name, counts in channel_record(build_model(arch)).items():
        if len(counts) == 1:
            record[name] = [channels]
        elif name == "fc":
            record[name] = [counts[0], channels]
        else:
            record[name] = [channels, 3 if name == "conv1" else channels]
    return {**arch, "channels": record}


HUGE = _everywhere(TINY, bounds.MAX_CHANNELS)


def test_a_record_with_8192_channels_everywhere_is_refused_before_building(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(models, "ResNet", never)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"resnet18 with [\d,]+ M parameters .* over the 500 M"):
        build_model(HUGE)
    assert time.perf_counter() - start < 0.5


def test_tensor_valued_sizes_are_read_as_numbers():
    with pytest.raises(UserError, match="width = 200000, outside 1.."):
        check_arch_size({**TINY, "width": torch.tensor(200_000)})
    channels = {k: [torch.tensor(c) for c in v] for k, v in HUGE["channels"].items()}
    with pytest.raises(UserError, match="M parameters"):
        check_arch_size({**TINY, "channels": channels})


def test_activations_are_bounded_at_the_data_image_size():
    widest_small = make_arch(name="resnet50", num_classes=10, width=bounds.MAX_WIDTH)
    check_arch_size(widest_small, image_size=32)
    with pytest.raises(UserError, match=r"layer outputs for one 512x512 image take [\d.]+ GB"):
        check_arch_size(widest_small, image_size=512)
    assert arch_size(widest_small, 512)[1] > MAX_ACTIVATION_BYTES
    # wide convs of few inputs: few parameters, huge feature maps
    wide = {**TINY, "channels": {f"layer1.{i}.conv{j}": [8192, 8] for i in (0, 1) for j in (1, 2)}}
    assert arch_size(wide, 512)[0] < MAX_PARAMS
    with pytest.raises(UserError, match="layer outputs"):
        build_model(wide, image_size=512)


def _save_checkpoint(path, arch: dict):
    torch.save({"state_dict": {}, "arch": arch, "params": {}, "metrics": {}}, path)
    return path


def test_load_model_names_the_file(tmp_path):
    checkpoint = _save_checkpoint(tmp_path / "huge.pt", HUGE)
    with pytest.raises(UserError, match=r"huge.pt: bad architecture record: .* M parameters"):
        load_model(checkpoint, num_classes=10)


def test_import_model_names_the_file(tmp_path):
    from resnet_slim.train.model_import import import_model

    checkpoint = _save_checkpoint(tmp_path / "huge.pt", HUGE)
    with pytest.raises(UserError, match=r"huge.pt: bad architecture record: .* M parameters"):
        import_model(checkpoint, num_classes=10)


def test_export_stage_refuses_the_huge_record_in_one_line(tmp_path, tiny_prepared):
    checkpoint = _save_checkpoint(tmp_path / "huge.pt", HUGE)
    out, report = tmp_path / "m.onnx", tmp_path / "parity.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.export",
            str(checkpoint),
            str(out),
            "--params",
            str(write_params(tmp_path / "params.yaml")),
            "--data",
            str(tiny_prepared),
            "--report",
            str(report),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, 2, "huge.pt", "parameters", "over the 500 M")
    assert not out.exists() and not report.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".m.onnx", ".parity"))]


# --- ONNX control flow ---------------------------------------------------------------------

IMAGE = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
LOGITS = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 8, 8])
OPSET = [helper.make_opsetid("", 17)]


def _loop_nodes(source: str, result: str) -> list:
    """A Loop of 2**62 iterations passing `source` through unchanged: it would never end."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 3, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 3, 8, 8]),
        ],
    )
    return [
        helper.make_node(
            "Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [2**62])
        ),
        helper.make_node(
            "Constant", [], ["go"], value=helper.make_tensor("g", TensorProto.BOOL, [], [True])
        ),
        helper.make_node("Loop", ["trips", "go", source], [result], body=body),
    ]


def _save(model: onnx.ModelProto, path):
    onnx.checker.check_model(model, full_check=True)  # a valid model: only the loop is wrong
    onnx.save(model, str(path))
    return path


def loop_onnx(path):
    graph = helper.make_graph(_loop_nodes("input", "logits"), "loop", [IMAGE], [LOGITS])
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def loop_in_if_onnx(path):
    """An If whose then-branch holds the Loop (nothing at the top level but the If)."""
    then_branch = helper.make_graph(
        _loop_nodes("input", "looped"),
        "then",
        [],
        [helper.make_tensor_value_info("looped", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["same"])],
        "else",
        [],
        [helper.make_tensor_value_info("same", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    nodes = [
        helper.make_node(
            "Constant", [], ["which"], value=helper.make_tensor("w", TensorProto.BOOL, [], [True])
        ),
        helper.make_node(
            "If", ["which"], ["logits"], then_branch=then_branch, else_branch=else_branch
        ),
    ]
    graph = helper.make_graph(nodes, "branch", [IMAGE], [LOGITS])
    return _save(helper.make_model(graph, opset_imports=OPSET), path)


def loop_in_function_onnx(path):
    """The Loop inside a model-local function that the main graph calls."""
    function = helper.make_function("local", "Forever", ["x"], ["y"], _loop_nodes("x", "y"), OPSET)
    graph = helper.make_graph(
        [helper.make_node("Forever", ["input"], ["logits"], domain="local")],
        "calls",
        [IMAGE],
        [LOGITS],
    )
    model = helper.make_model(
        graph, opset_imports=[*OPSET, helper.make_opsetid("local", 1)], functions=[function]
    )
    return _save(model, path)


@pytest.mark.parametrize(
    "make, ops",
    [(loop_onnx, "(Loop)"), (loop_in_if_onnx, "(If, Loop)"), (loop_in_function_onnx, "(Loop)")],
    ids=["loop", "loop-in-if", "loop-in-function"],
)
def test_control_flow_is_refused_before_onnxruntime_loads_it(tmp_path, make, ops):
    path = make(tmp_path / "flow.onnx")
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        make_session(path)
    assert time.perf_counter() - start < 2.0
    assert str(err.value).startswith(f"{path}: the graph has control flow {ops}")
    assert "\n" not in str(err.value)


def test_scan_and_subgraph_ops_of_any_domain_are_found():
    scan_body = helper.make_graph([], "b", [], [])
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Scan", ["a"], ["b"], body=scan_body, num_scan_inputs=1),
                helper.make_node("Search", ["a"], ["c"], domain="com.example", decoder=scan_body),
                helper.make_node("Relu", ["a"], ["d"]),
            ],
            "g",
            [],
            [],
        )
    )
    assert control_flow_ops(model) == ["Scan", "com.example:Search"]


def test_a_loop_is_refused_by_benchmark_and_ptq_writing_nothing(tmp_path, tiny_prepared):
    path = loop_onnx(tmp_path / "loop.onnx")
    images, labels = normalized_split(tiny_prepared, "test")
    with pytest.raises(UserError, match="loop.onnx: the graph has control flow"):
        benchmark_model(path, images, labels, BenchmarkParams(), num_classes=10)
    calibration = images[:4].numpy()
    with pytest.raises(UserError, match="control flow"):
        quantize_static_int8(path, tmp_path / "int8.onnx", calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx"]


def test_feed_forward_models_still_load(tmp_path, tiny_model):
    export_onnx(tiny_model, tmp_path / "m.onnx", image_size=8, opset=17)
    assert control_flow_ops(onnx.load(str(tmp_path / "m.onnx"))) == []
    out = make_session(tmp_path / "m.onnx").run(None, {"input": np.zeros((2, 3, 8, 8), np.float32)})
    assert out[0].shape == (2, 10)


# --- finite inputs and outputs of the benchmark --------------------------------------------


def test_a_model_with_nan_logits_is_not_scored(tmp_path, tiny_model, tiny_prepared):
    with torch.no_grad():
        tiny_model.fc.bias[3] = float("nan")
    export_onnx(tiny_model, tmp_path / "nan.onnx", image_size=8, opset=17)
    images, labels = normalized_split(tiny_prepared, "test")
    with pytest.raises(UserError) as err:
        benchmark_model(tmp_path / "nan.onnx", images, labels, BenchmarkParams(), num_classes=10)
    assert str(err.value) == (
        f"{tmp_path / 'nan.onnx'}: the model outputs non-finite (NaN/inf) logits for "
        f"{len(labels)} of {len(labels)} test images, so it cannot be scored; its weights are "
        f"broken (diverged training or a corrupt file)"
    )


def test_non_finite_test_images_are_refused(tmp_path, tiny_model, tiny_prepared):
    export_onnx(tiny_model, tmp_path / "m.onnx", image_size=8, opset=17)
    # what a meta.json std of 0 gives (load_meta refuses such a file; benchmark_model takes any
    # tensor, so it checks again)
    meta = load_meta(tiny_prepared)
    split = load_split(tiny_prepared, "test")
    images = normalize(to_tensor(split.images), {**meta, "std": [0.0, *meta["std"][1:]]})
    labels = split.labels
    with pytest.raises(
        UserError,
        match=rf"^{len(labels)} of {len(labels)} normalised test images hold non-finite .*std > 0",
    ):
        benchmark_model(tmp_path / "m.onnx", images, labels, BenchmarkParams(), num_classes=10)
    one_bad, _ = normalized_split(tiny_prepared, "test")
    one_bad[5, 1, 2, 3] = float("inf")
    with pytest.raises(UserError, match=f"^1 of {len(labels)} normalised test images"):
        benchmark_model(tmp_path / "m.onnx", one_bad, labels, BenchmarkParams(), num_classes=10)
    with pytest.raises(UserError, match="calibration images hold non-finite values"):
        calibration_images(images, 8, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(
    "counts",
    [torch.tensor([8192, 8192]), {8192, 4096}, {8192: 0, 4096: 1}],
    ids=["tensor", "set", "dict"],
)
def test_channel_counts_that_are_not_a_list_are_refused(counts):
    with pytest.raises(UserError, match=r"channels\['layer1.0.conv1'\] is a \w+, not a list"):
        build_model({**TINY, "channels": {"layer1.0.conv1": counts}})
