"""What resumable training costs (resnet_slim/train/resume.py), against an epoch of the work it
protects: ResNet-56 (../shared/models) trained at batch 128 on a CIFAR-10-sized train split (41,400
images, 32 px; random pixels: the cost does not depend on their values).

    python -m benchmarks.resume_overhead [--out benchmarks/resume_overhead.json]

Measured, in one process, one after the other: the per-epoch checkpoint (weights, SGD momentum,
scheduler, history, random state; serialised, hashed, written with fsync and renamed), the
once-per-phase key (digests of the code, the 41,400 + 4,600 images and the starting weights),
and `steps` training steps, scaled to the 324 steps of one epoch. Goal: checkpoint <= 2 % of
an epoch.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from resnet_slim.data.loader import BatchLoader  # noqa: E402
from resnet_slim.hardware import cpu_info, has_int8_dot_product  # noqa: E402
from resnet_slim.params import Augment, TrainParams  # noqa: E402
from resnet_slim.train import engine, resume  # noqa: E402
from resnet_slim.train.model_import import import_model  # noqa: E402

TRAIN, VAL, BATCH = 41_400, 4_600, 128
META = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_size": 32}


def loader(n: int, seed: int, augment=None) -> BatchLoader:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, 10, size=n))
    return BatchLoader(
        images, labels, meta=META, batch_size=BATCH, shuffle=True, augment=augment, seed=seed
    )


def seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "resume_overhead.json"))
    parser.add_argument("--steps", type=int, default=30, help="training steps timed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    engine.seed_everything(0, args.threads)
    model, _, _ = import_model(
        REPO.parent / "shared" / "models" / "resnet56-4bfd9763.th", "cifar_resnet", num_classes=10
    )
    train = loader(TRAIN, 0, Augment(crop_padding=4, hflip=True))
    val = loader(VAL, 1)
    p = TrainParams(epochs=30, lr=0.02, batch_size=BATCH, warmup_epochs=0)
    optimizer, scheduler = engine.make_optimizer(model, p, TRAIN // BATCH)
    loss_fn = engine.cross_entropy()

    model.train()
    batches = iter(train)
    step_times = []
    for _ in range(args.steps + 3):  # 3 warm-up steps
        images, labels = next(batches)
        started = time.perf_counter()
        loss, _ = loss_fn(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_times.append(time.perf_counter() - started)
    step_s = statistics.median(step_times[3:])
    epoch_s = step_s * len(train)

    session = resume.Session(Path(tempfile.mkdtemp()), {"distill.lr": 0.02})
    key_s = seconds(
        lambda: resume.fit_key(
            session, desc="bench", model=model, train_loader=train, val_loader=val
        ),
        3,
    )
    key = resume.fit_key(session, desc="bench", model=model, train_loader=train, val_loader=val)
    history = [{"epoch": e, "val_top1": 90.0, "train_loss": 0.3} for e in range(30)]
    path = session.directory / "bench-rank0.pt"

    def save() -> None:
        resume.save(
            path,
            {
                "key": key,
                "epochs_done": 30,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "random": resume.random_state(train),
            },
        )

    save_s = seconds(save, 5)
    load_s = seconds(lambda: resume.load(path, key), 5)
    cpu, _ = cpu_info()
    result = {
        "cpu": cpu,
        "vnni": has_int8_dot_product(),
        "torch_threads": args.threads,
        "train_step_s": round(step_s, 4),
        "epoch_s_estimated": round(epoch_s, 1),
        "checkpoint_bytes": path.stat().st_size,
        "checkpoint_save_s": round(save_s, 4),
        "checkpoint_load_s": round(load_s, 4),
        "key_s_per_phase": round(key_s, 3),
        "checkpoint_share_of_epoch_pct": round(100 * save_s / epoch_s, 3),
        "key_share_of_epoch_pct": round(100 * key_s / epoch_s, 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
