"""DDP training with torchrun: per-rank sharding, and the teacher stage on 1 vs 2 processes."""

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from resnet_slim import data, distributed
from resnet_slim.errors import UserError
from resnet_slim.io import sha256_file
from resnet_slim.models import load_model
from resnet_slim.params import Augment
from tests.conftest import REPO, write_params

# tiny digits (8 px, 240 training images), width 8: ~10 s in one process, ~25 s with two
# (most of it is interpreters importing torch)
TINY_TEACHER = {"width": 8, "epochs": 6, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0.5}
# Val top-1 measured here with base.seed 0-3: one process 96.25 / 91.25 / 95.0 / 92.5 %, two
# processes 91.25 / 88.75 / 91.25 / 91.25 % (80 val images: one image is 1.25 pp). The gap (1.25-5
# pp, two processes lower) is BatchNorm: each rank normalises over its own 8 images and there is no
# SyncBatchNorm on CPU. Without BN the two runs agree to float precision (test below).
MAX_TOP1_GAP_PP = 10.0

# Trains a BN-free ResNet with the shared loop, in one process or as a torchrun worker.
NO_BN_SCRIPT = """
import json, sys, torch
from resnet_slim import distributed, engine
from resnet_slim.data import train_val_loaders
from resnet_slim.models import build_model, make_arch
from resnet_slim.params import Augment, TrainParams

def without_bn(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, torch.nn.Identity())
        else:
            without_bn(child)
    return module

def main(prepared, out):
    cpu = torch.device("cpu")
    with distributed.process_group(cpu):
        rank, world_size = distributed.rank(), distributed.world_size()
        engine.seed_everything(0, 1)
        train, val, _ = train_val_loaders(prepared, batch_size=16, augment=Augment(crop_padding=0),
                                          seed=0, rank=rank, world_size=world_size)
        model = without_bn(build_model(make_arch(name="resnet18", num_classes=10, width=8)))
        model = distributed.wrap_model(model, cpu)
        history = engine.fit(model, train, val, TrainParams(epochs=2, lr=0.02, warmup_epochs=0.5),
                             loss_fn=engine.cross_entropy(), live_dir=out + "/live", desc="no-bn")
        if distributed.is_main_process():
            weights = distributed.unwrap(model).fc.weight.detach()
            with open(out + "/result.json", "w") as f:
                json.dump({"history": history, "fc_sum": weights.sum().item()}, f)

if __name__ == "__main__":
    main(*sys.argv[1:])
"""


def shard_all(n: int, world_size: int, pad: bool = True) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return [data.shard_indices(order, rank=r, world_size=world_size, pad=pad).tolist()
            for r in range(world_size)]


@pytest.mark.parametrize("n", [12, 13, 3])
def test_training_shards_cover_every_image_with_equal_lengths(n):
    shards = shard_all(n, world_size=4)
    assert len({len(s) for s in shards}) == 1  # DDP: the same number of steps on every rank
    assert set().union(*shards) == set(range(n))
    if n % 4 == 0:  # nothing padded: disjoint
        assert sum(len(s) for s in shards) == n


@pytest.mark.parametrize("n", [12, 13, 3])
def test_evaluation_shards_are_disjoint_and_cover_once(n):
    shards = shard_all(n, world_size=4, pad=False)
    assert sorted(i for s in shards for i in s) == list(range(n))


def test_one_process_is_unsharded():
    order = torch.randperm(7)
    assert torch.equal(data.shard_indices(order, rank=0, world_size=1), order)


def test_ranks_share_the_permutation_and_reshuffle_every_epoch(tiny_prepared):
    split = data.load_split(tiny_prepared, "train")
    meta = data.load_meta(tiny_prepared)
    # labels replaced by image indices, to see which images each rank got; augmentation on, to
    # check that its (per-rank) random draws do not desynchronise the shared permutation
    index = torch.arange(len(split.images))
    assert len(index) % 2 == 0  # nothing padded: the shards must be disjoint
    loaders = [data.BatchLoader(split.images, index, meta=meta, batch_size=8, shuffle=True,
                                augment=Augment(), seed=0, rank=r, world_size=2) for r in range(2)]
    epochs = [[torch.cat([ids for _, ids in loader]).tolist() for loader in loaders]
              for _ in range(2)]
    for rank0, rank1 in epochs:
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == index.tolist()
        assert len(loaders[0]) == len(loaders[1]) == -(-len(rank0) // 8)
    assert epochs[0][0] != epochs[1][0]  # a new permutation each pass


def test_one_process_loader_is_unchanged_by_sharding_support(tiny_prepared):
    """world_size 1 draws order and augmentation from one generator, exactly as before DDP."""
    split = data.load_split(tiny_prepared, "train")
    meta = data.load_meta(tiny_prepared)
    loader = data.BatchLoader(split.images, split.labels, meta=meta, batch_size=32, shuffle=True,
                              augment=Augment(), seed=3)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(len(split.images), generator=generator)
    first_images, first_labels = next(iter(loader))
    expected = data.augment_batch(split.images[order[:32]], crop_padding=2, hflip=False,
                                  generator=generator)
    assert torch.equal(first_labels, split.labels[order[:32]])
    assert torch.equal(first_images, data.normalize(expected, meta))


def test_device_and_plan_errors_are_one_line():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda requested but this torch sees no CUDA device"):
            distributed.resolve_device("cuda")
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="batch_size 30 does not split evenly over 4 processes"):
        distributed.check_plan(nproc=4, device=cpu, sync_bn=False, batch_size=30)
    with pytest.raises(UserError, match="SyncBatchNorm runs on GPUs only"):
        distributed.check_plan(nproc=2, device=cpu, sync_bn=True, batch_size=32)
    distributed.check_plan(nproc=1, device=cpu, sync_bn=True, batch_size=31)  # nothing to sync


def with_path(folder) -> dict:
    """The environment with `folder` importable (torchrun workers run `python -m <module>`)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ["PYTHONPATH"]])}


def test_two_processes_equal_one_process_without_batchnorm(tmp_path, tiny_prepared):
    """DDP over 2 ranks = one process with the same global batch: sharding, gradient averaging,
    metric sums and the LR schedule all match; only BN (per-rank statistics) can differ."""
    script = tmp_path / "no_bn.py"
    script.write_text(NO_BN_SCRIPT)
    outs = {nproc: tmp_path / f"no_bn_{nproc}" for nproc in (1, 2)}
    for out in outs.values():
        out.mkdir()
    threads = torch.get_num_threads()
    try:  # one process: in this interpreter (saves importing torch once more)
        runpy.run_path(str(script))["main"](str(tiny_prepared), str(outs[1]))
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run(
        [sys.executable, "-c", "from resnet_slim.distributed import launch_with_torchrun; "
         f"raise SystemExit(launch_with_torchrun(2, module='no_bn', "
         f"argv={[str(tiny_prepared), str(outs[2])]!r}))"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=with_path(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((outs[n] / "result.json").read_text()) for n in (1, 2))
    for row_one, row_two in zip(one["history"], two["history"], strict=True):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "lr"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4, abs=1e-6), key
    assert two["fc_sum"] == pytest.approx(one["fc_sum"], rel=1e-4, abs=1e-5)


def run_teacher(tmp_path, tiny_prepared, nproc: int, **base) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"nproc{nproc}"
    params = write_params(tmp_path / f"params{nproc}.yaml", teacher=TINY_TEACHER,
                          base={"nproc": nproc, "augment": {"crop_padding": 0, "hflip": False}, **base})
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "stages/train_teacher.py", "--params", str(params), "--data",
         str(tiny_prepared), "--out", str(out / "teacher.pt"), "--live", str(out / "live")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return result, {"out": out}


def test_teacher_on_two_processes_matches_one_and_writes_once(tmp_path, tiny_prepared):
    top1 = {}
    for nproc in (1, 2):
        result, where = run_teacher(tmp_path, tiny_prepared, nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        out = where["out"]
        # exactly one checkpoint and one DVCLive directory: no per-rank copies, no temp files
        assert sorted(p.name for p in out.iterdir()) == ["live", "teacher.pt"]
        assert sorted(p.name for p in (out / "live").iterdir()) == ["metrics.json", "plots", "summary.json"]
        assert result.stdout.count("teacher epoch 6/6") == 1  # only rank 0 prints
        model, checkpoint = load_model(out / "teacher.pt", num_classes=10)
        assert next(model.parameters()).device.type == "cpu"
        summary = json.loads((out / "live" / "summary.json").read_text())
        outputs = summary.pop("outputs")  # the set record: the checkpoint it belongs to
        assert summary == checkpoint["metrics"]
        assert outputs["checkpoint"]["sha256"] == sha256_file(out / "teacher.pt")
        top1[nproc] = summary["val_top1"]
    assert "torchrun: 2 processes" in result.stdout
    assert top1[1] > 80.0 and top1[2] > 80.0, top1  # chance is 10 %
    assert abs(top1[2] - top1[1]) <= MAX_TOP1_GAP_PP, top1


def test_bad_plan_stops_before_launching_workers(tmp_path, tiny_prepared):
    result, where = run_teacher(tmp_path, tiny_prepared, 2, sync_bn=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: base.sync_bn: torch's SyncBatchNorm runs on GPUs only; set it to false on CPU "
        "(each process then normalises over its own share of the batch)"]
    assert not where["out"].exists()


def test_failed_worker_gives_its_exit_code_and_one_line(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import os, sys\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    print('error: rank 1 found bad input', file=sys.stderr)\n"
                      "    sys.exit(2)\n")
    result = subprocess.run(
        [sys.executable, "-c", "from resnet_slim.distributed import launch_with_torchrun; "
         "raise SystemExit(launch_with_torchrun(2, module='worker', argv=[]))"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=with_path(tmp_path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 found bad input",
                      "error: torchrun: worker rank 1 of 2 exited with code 2; its own message is "
                      "above (nothing was saved)"], result.stderr
