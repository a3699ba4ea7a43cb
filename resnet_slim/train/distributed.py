"""Training on several processes with PyTorch's own engines: torchrun + DistributedDataParallel.

Every training stage (train_teacher, slim_prune, lowrank, cache_teacher, distill_student, qat) runs
its work through `run_training_stage`: `base.device` picks CPU or CUDA, and `base.nproc > 1` makes
the stage re-launch itself with torchrun (in this process: `torch.distributed.run`, the module
behind the `torchrun` command, with `--standalone`). Each worker reads RANK / WORLD_SIZE /
LOCAL_RANK from its environment, joins the process group (gloo on CPU, nccl on CUDA), wraps the
model in DDP and trains on its 1/N share of every epoch (see `data.shard_indices`); losses and
accuracies are summed over ranks, and only rank 0 logs and writes files. Several machines: run
torchrun yourself on every node, e.g.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node0:29400 \
        --rdzv-id teacher -m stages.train_teacher --data data/prepared --out models/teacher.pt

(the same command on each node; global rank 0 writes the outputs on its node).
"""

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnet_slim.errors import UserError


def under_torchrun() -> bool:
    """True in a worker started by torchrun (it sets these variables for every worker)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that logs and writes files."""
    return rank() == 0


def planned_world_size(nproc: int) -> int:
    """torchrun's WORLD_SIZE inside a worker (all nodes), else the `base.nproc` we would launch."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else nproc


def threads_per_process(threads: int) -> int:
    """Split `base.threads` among the processes on this machine, so 2 workers on 2 cores don't
    oversubscribe (torchrun sets LOCAL_WORLD_SIZE: workers on this node)."""
    return max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `auto` (CUDA when torch sees a GPU) -> this process's device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            "base.device: cuda requested but this torch sees no CUDA device; use cpu or auto"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # one GPU per worker process
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"base.device: worker {local_rank} needs GPU {local_rank} but this machine "
            f"has {torch.cuda.device_count()}; lower base.nproc"
        )
    return torch.device("cuda", local_rank)


def check_plan(
    *, nproc: int, device: torch.device, sync_bn: bool, batch_sizes: dict[str, int]
) -> None:
    """Refuse settings that cannot work before any worker starts (one clear line each).

    batch_sizes: {params key: global batch} of every training phase,
    e.g. {"teacher.batch_size": 128}.
    """
    if nproc == 1:
        return
    for key, batch_size in batch_sizes.items():
        if batch_size % nproc:
            raise UserError(
                f"{key} {batch_size} does not split evenly over {nproc} processes "
                f"(base.nproc); use a multiple of {nproc}"
            )
    if sync_bn and device.type != "cuda":
        # torch's SyncBatchNorm raises on CPU tensors; BN then sees per-process batches
        raise UserError(
            "base.sync_bn: torch's SyncBatchNorm runs on GPUs only; set it to false "
            "on CPU (each process then normalises over its own share of the batch)"
        )
    if device.type == "cuda" and not under_torchrun() and nproc > torch.cuda.device_count():
        raise UserError(
            f"base.nproc {nproc} > {torch.cuda.device_count()} GPUs on this machine; "
            f"use at most one process per GPU"
        )


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group (nccl for CUDA, gloo for CPU) for the block; no-op
    otherwise."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap_model(model: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """The model on `device`; in a process group, wrapped in DDP (optionally with SyncBatchNorm).

    DDP broadcasts rank 0's weights and buffers at construction, so every rank starts alike.
    """
    model = model.to(device)
    if world_size() == 1:
        return model
    if sync_bn:
        # BN statistics over the global batch: what network slimming's gammas are learned under
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (what is evaluated and saved)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def plain_cpu(model: nn.Module) -> nn.Module:
    """The trained model as one CPU process would hold it: out of DDP, SyncBatchNorm back to
    BatchNorm2d, on the CPU. What is pruned, factorised, counted and saved after training (the
    model itself in one CPU process: nothing to undo)."""
    return _without_sync_bn(unwrap(model).cpu())


def _without_sync_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.SyncBatchNorm):  # the models here only have BatchNorm2d to convert
        plain = nn.BatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        plain.load_state_dict(module.state_dict())
        return plain.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, _without_sync_bn(child))
    return module


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks (every rank gets them); the values unchanged in one process."""
    if world_size() == 1:
        return values
    total = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=_collective_device()
    )
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def gather_in_order(shard: torch.Tensor, total: int) -> torch.Tensor | None:
    """Undo evaluation sharding: rank r holds rows r, r + N, r + 2N, ... of a `total`-row result
    (`data.shard_indices(pad=False)`); rank 0 gets all rows in the split's order, the others None.
    In one process: `shard` itself."""
    if world_size() == 1:
        return shard
    n_ranks, device = world_size(), _collective_device()
    rows = -(-total // n_ranks)  # the largest share; smaller ones are padded to it for gather
    padded = torch.zeros((rows, *shard.shape[1:]), dtype=shard.dtype, device=device)
    padded[: len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in range(n_ranks)] if rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank() != 0:
        return None
    ordered = torch.empty((total, *shard.shape[1:]), dtype=shard.dtype)
    for r, part in enumerate(parts):
        ordered[r::n_ranks] = part[: len(range(r, total, n_ranks))].cpu()
    return ordered


def _collective_device() -> torch.device:
    """Where tensors for a collective must live: nccl moves CUDA tensors only, gloo CPU ones."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank.

    DDP broadcasts them before each forward, but the last forward of an epoch updates each rank's
    copy with its own batch: without this, ranks would evaluate slightly different models.
    """
    if world_size() == 1:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def launch_with_torchrun(nproc: int, *, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` in `nproc` workers with torchrun on this machine;
    their exit code.

    Equivalent to `torchrun --standalone --nproc-per-node nproc -m module argv` (same launcher, run
    in this process). A failed worker's own `error:` line is printed by the worker; this adds one
    line naming the rank and returns its exit code (2 for bad input, as in one process).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # workers set their own torch thread count (threads_per_process); this only stops torchrun
    # from printing its OMP_NUM_THREADS banner
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # -m, not a script path: workers import the library from their cwd, the stage's workspace
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", module, *argv])
    print(f"torchrun: {nproc} processes on this machine", flush=True)
    try:
        run(args)
    except ChildFailedError as err:
        failed_rank, failure = err.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(
            f"error: torchrun: worker rank {failed_rank} of {nproc} {how}; its own message is "
            f"above (nothing was saved)",
            file=sys.stderr,
        )
        return 128 - code if code < 0 else code
    except SignalException:  # SIGTERM/SIGINT to the launcher: it has already stopped the workers
        raise KeyboardInterrupt from None
    return 0


def run_training_stage(
    *,
    module: str,
    argv: list[str] | None,
    base,
    batch_sizes: dict[str, int],
    train: Callable[[torch.device], None],
) -> int:
    """Run a stage's `train(device)` on `base.device` in `base.nproc` processes; the exit code.

    The one way every training stage starts: resolve the device, refuse a plan that cannot work
    (`check_plan`, before any worker starts), and with nproc > 1 outside torchrun re-launch
    `python -m module argv` under torchrun, whose workers come back here. In a worker (or the
    only process) join the process group and call `train`, which must write outputs on rank 0
    only (`is_main_process`). batch_sizes: {params key: global batch} of every training phase.
    """
    device = resolve_device(base.device)
    nproc = planned_world_size(base.nproc)
    check_plan(nproc=nproc, device=device, sync_bn=base.sync_bn, batch_sizes=batch_sizes)
    if nproc > 1 and not under_torchrun():
        return launch_with_torchrun(
            nproc, module=module, argv=sys.argv[1:] if argv is None else list(argv)
        )
    with process_group(device):
        if is_main_process() and (device.type == "cuda" or nproc > 1):
            # one line, so a log shows where a run trained (one CPU process prints nothing new)
            print(
                f"{module.rpartition('.')[2]}: running on {device}, {nproc} process"
                f"{'es' if nproc > 1 else ''}",
                flush=True,
            )
        train(device)
    return 0
