"""Helpers that exist once and serve every caller: the timing loop, usable cores, batched PyTorch
inference and top-1, replacing a submodule by name, and ptq.reduce_range's "auto"."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from resnet_slim.compress.export import torch_logits
from resnet_slim.compress.quant import resolve_reduce_range
from resnet_slim.data.loader import normalized_split
from resnet_slim.measure import bench, timing
from resnet_slim.train import engine
from resnet_slim.train.models import build_model, make_arch, replace_submodule


def test_time_ms_discards_the_warmup_and_returns_one_time_per_run():
    calls = []
    times = timing.time_ms(lambda: calls.append(1), warmup=3, runs=5)
    assert len(calls) == 8 and times.shape == (5,) and (times >= 0).all()
    stats = timing.percentiles_ms(times)
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] and set(stats) == {
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "mean_ms",
    }


def test_torch_latency_restores_the_thread_count(tiny_model):
    before = torch.get_num_threads()
    stats = bench.torch_latency_ms(tiny_model, torch.zeros(1, 3, 8, 8), threads=1, warmup=1, runs=3)
    assert stats["p50_ms"] > 0 and torch.get_num_threads() == before


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_usable_cores_is_this_process_affinity():
    """Pinned to one core (taskset, a container's cpuset), a process has one core to use, however
    many the machine has: checked in a child pinned to core 0 first, then to all of its cores."""
    probe = (
        "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
        "from resnet_slim import hardware, limits; "
        "print(limits.usable_cores(), hardware.hardware_fingerprint()['usable_cores'])"
    )
    allowed = sorted(os.sched_getaffinity(0))
    for cores in ([allowed[0]], allowed):
        out = subprocess.run(
            [sys.executable, "-c", probe, ",".join(map(str, cores))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == [str(len(cores))] * 2, (cores, out)


def test_batched_torch_inference_and_top1_match_the_training_loops_evaluate(
    tiny_model, tiny_prepared
):
    images, labels = normalized_split(tiny_prepared, "test")
    batches = [(images[i : i + 256], labels[i : i + 256]) for i in range(0, len(images), 256)]
    logits, _ = engine.predict(tiny_model, batches)
    assert torch.equal(torch.from_numpy(torch_logits(tiny_model, images, batch_size=7)), logits)
    assert (
        bench.torch_top1(tiny_model, images, labels) == engine.evaluate(tiny_model, batches)["top1"]
    )


def test_replace_submodule_nested_and_top_level():
    model = build_model(make_arch(name="resnet18", num_classes=10, width=8, small_input=True))
    replace_submodule(model, "layer1.0.conv1", nn.Identity())
    replace_submodule(model, "fc", nn.Linear(64, 3))
    assert isinstance(model.layer1[0].conv1, nn.Identity) and model.fc.out_features == 3
    with pytest.raises(AttributeError):
        replace_submodule(model, "layer9.conv1", nn.Identity())


def test_reduce_range_auto_follows_the_cpu_and_explicit_values_win(monkeypatch):
    import resnet_slim.compress.quant as quant

    for vnni in (True, False):
        monkeypatch.setattr(quant, "has_int8_dot_product", lambda vnni=vnni: vnni)
        assert resolve_reduce_range("auto") is (not vnni)
        assert resolve_reduce_range(True) is True and resolve_reduce_range(False) is False
