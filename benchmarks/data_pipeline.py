"""Data at full size: prepare's wall time and peak memory, and the loader's share of an epoch.

    python -m benchmarks.data_pipeline                 # all three measurements (~10 min, 2 cores)
    python -m benchmarks.data_pipeline --only cifar10  # cifar10 | synthetic | loader

1. `cifar10`: `python -m stages.prepare` on ../shared/datasets/cifar10 (46,000 train + 8,000 test
   JPEGs, given split) at 32 px: wall time and peak RSS (goal: <= 90 s, <= 1 GB).
2. `synthetic`: writes an ImageFolder of 20,000 images at 224 px (3 GB decoded; 10 classes of
   smooth random shapes, JPEG), then runs `stages.prepare` and one epoch of the shared training
   loop (`engine.fit` over the memory-mapped train split, augmentation on) for a small CNN: peak
   RSS of each (goal: <= 1.5 GB each).
3. `loader`: the default teacher (params.yaml) on the prepared CIFAR-10 train split: the loader
   alone over a whole epoch (read rows from the memory map, augment, normalise) vs the training
   step (forward, backward, SGD) timed over `--steps` batches and scaled to the epoch
   (goal: loading <= 10 % of the epoch).

Each stage runs as its own process; its peak RSS is the kernel's ru_maxrss for that process and
the workers it waited for (wait4). Results go to --out as JSON and to stdout as a markdown table.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            vnni = "avx512_vnni" in flags or "avx_vnni" in flags
            return f"{line.split(':', 1)[1].strip()} ({'with' if vnni else 'no'} VNNI)"
    return platform.processor() or "unknown CPU"


def run_measured(command: list[str], cwd: Path) -> dict:
    """Run `command`; its wall time (s), peak RSS (MB, the process and its waited-for children)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{output[-3000:]}")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "log_tail": output.strip().splitlines()[-1:],
    }


def write_params(path: Path, **sections) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def prepare(workdir: Path, root: Path, image_size: int, name: str) -> dict:
    params = write_params(
        workdir / f"{name}.yaml",
        prepare={
            "source": "imagefolder",
            "root": str(root),
            "image_size": image_size,
            "split": "auto",
            "normalize": "imagenet",
        },
    )
    return run_measured(
        [
            sys.executable,
            "-m",
            "stages.prepare",
            "--params",
            str(params),
            "--out",
            str(workdir / name),
        ],
        cwd=workdir,
    )


def _write_synthetic_class(args: tuple[Path, int, int, int, int]) -> None:
    from PIL import Image, ImageDraw

    folder, label, count, size, seed = args
    rng = np.random.default_rng([seed, label])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # a random gradient with random ellipses: compresses like a photo, not like noise (the
        # classes are not learnable: this measures time and memory, not accuracy)
        base = (np.linspace(0, 1, size)[None, :, None] * rng.integers(0, 255, 3)).astype(np.uint8)
        image = Image.fromarray(np.broadcast_to(base, (size, size, 3)).copy())
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(8, size // 3))
            draw.ellipse(
                [x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
            )
        image.save(folder / f"{i:05d}.jpg", quality=90)


def write_synthetic(root: Path, *, images: int, size: int, classes: int = 10) -> Path:
    """root/train/<class>/ (80 %) and root/test/<class>/ (20 %) JPEGs; reused if complete."""
    marker = root / f".complete-{images}-{size}"
    if marker.is_file():
        return root
    from multiprocessing import Pool

    per_class = images // classes
    jobs = [
        (root / split / f"class{c}", c + 100 * (split == "test"), n, size, 0)
        for c in range(classes)
        for split, n in (("train", per_class * 4 // 5), ("test", per_class // 5))
    ]
    with Pool(len(os.sched_getaffinity(0))) as pool:
        pool.map(_write_synthetic_class, jobs)
    marker.touch()
    return root


def train_one_epoch(workdir: Path, prepared: Path) -> dict:
    """One epoch of the shared training loop (`engine.fit`, the real loader with augmentation)
    over the whole train split, in its own process, for a small CNN: the loader's memory shows,
    not the model's compute (a ResNet-18 epoch at 224 px takes ~25 min on 2 cores)."""
    return run_measured(
        [
            sys.executable,
            "-m",
            "benchmarks.data_pipeline",
            "--epoch-child",
            str(prepared),
            "--workdir",
            str(workdir),
        ],
        cwd=workdir,
    )


def epoch_child(prepared: Path, workdir: Path) -> None:
    import torch
    from torch import nn

    from resnet_slim.data import loader as data
    from resnet_slim.params import Augment, TrainParams
    from resnet_slim.train import engine

    engine.seed_everything(0, 2)
    train, val, meta = data.train_val_loaders(
        prepared, batch_size=64, seed=0, augment=Augment(crop_padding=16, hflip=True)
    )
    model = nn.Sequential(  # ~25 MMAC per 224-px image
        nn.Conv2d(3, 16, 7, stride=4, padding=3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, len(meta["class_names"])),
    )
    start = time.perf_counter()
    history = engine.fit(
        model,
        train,
        val,
        TrainParams(epochs=1, lr=0.05, warmup_epochs=0),
        loss_fn=engine.cross_entropy(0.0),
        live_dir=workdir / "epoch-live",
        desc="epoch",
    )
    print(
        f"one epoch: {len(train)} batches in {time.perf_counter() - start:.1f} s, "
        f"val top-1 {history[-1]['val_top1']:.1f} % (torch {torch.__version__})"
    )


def loader_share(prepared: Path, steps: int) -> dict:
    """The default teacher on `prepared`: loader-alone epoch time vs the step time of an epoch."""
    import torch

    from resnet_slim.data import loader as data
    from resnet_slim.params import load_params
    from resnet_slim.train import engine
    from resnet_slim.train.models import build_model, make_arch

    params = load_params(REPO / "params.yaml")
    p, base = params.teacher, params.base
    engine.seed_everything(base.seed, base.threads)
    train_loader, _, meta = data.train_val_loaders(
        prepared, batch_size=p.batch_size, augment=base.augment, seed=base.seed
    )
    start = time.perf_counter()
    batches = sum(1 for _ in train_loader)
    loader_s = time.perf_counter() - start

    model = build_model(
        make_arch(
            name=p.arch,
            num_classes=len(meta["class_names"]),
            width=p.width,
            small_input=p.small_input,
        )
    )
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    fixed = [
        batch for _, batch in zip(range(steps + 2), train_loader, strict=False)
    ]  # loaded before timing
    for images, labels in fixed[:2]:  # warm-up (allocator, oneDNN kernels)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    start = time.perf_counter()
    for images, labels in fixed[2:]:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(
            model(images.contiguous(memory_format=torch.channels_last)), labels
        )
        loss.backward()
        optimizer.step()
    step_s = (time.perf_counter() - start) / steps * batches
    return {
        "arch": f"{p.arch} width {p.width}",
        "batch_size": p.batch_size,
        "batches": batches,
        "loader_epoch_s": round(loader_s, 1),
        "steps_timed": steps,
        "step_epoch_s_estimated": round(step_s, 1),
        "loader_share_pct": round(100 * loader_s / (loader_s + step_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cifar10", default=str(REPO.parent / "shared/datasets/cifar10"))
    parser.add_argument("--workdir", default="/tmp/resnet-slim-data-bench")
    parser.add_argument("--synthetic-images", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=20, help="training steps timed (loader)")
    parser.add_argument("--only", choices=["cifar10", "synthetic", "loader"], action="append")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "data_pipeline.json"))
    parser.add_argument("--epoch-child", help=argparse.SUPPRESS)  # see train_one_epoch
    args = parser.parse_args()
    if args.epoch_child:
        return epoch_child(Path(args.epoch_child), Path(args.workdir))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    todo = args.only or ["cifar10", "synthetic", "loader"]
    results = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "date": time.strftime("%Y-%m-%d"),
    }
    if "cifar10" in todo or "loader" in todo:
        results["prepare_cifar10"] = prepare(workdir, Path(args.cifar10), 32, "cifar10")
        print("prepare cifar10:", results["prepare_cifar10"], flush=True)
    if "synthetic" in todo:
        start = time.perf_counter()
        root = write_synthetic(workdir / "synthetic", images=args.synthetic_images, size=224)
        results["synthetic_written_s"] = round(time.perf_counter() - start, 1)
        results["prepare_synthetic_224"] = prepare(workdir, root, 224, "synthetic-prepared")
        print("prepare synthetic:", results["prepare_synthetic_224"], flush=True)
        results["train_epoch_synthetic_224"] = train_one_epoch(
            workdir, workdir / "synthetic-prepared"
        )
        print("one epoch synthetic:", results["train_epoch_synthetic_224"], flush=True)
    if "loader" in todo:
        results["loader_cifar10"] = loader_share(workdir / "cifar10", args.steps)
        print("loader:", results["loader_cifar10"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
