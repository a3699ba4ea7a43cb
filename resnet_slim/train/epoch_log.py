"""What the training loop reports: DVCLive metrics and one console line per epoch, on rank 0.

`engine.fit` opens the logger (`open_live`, which replays a resumed run's finished epochs), logs
each epoch's history row (`log_epoch`) and ends the logger itself once training is done.
"""

from pathlib import Path

from resnet_slim.train import distributed


def open_live(live_dir: str | Path, history: list[dict]):
    """The DVCLive logger on rank 0, the finished epochs of a resumed run (`history`) logged
    again so its curves continue; None on the other ranks (only rank 0 logs)."""
    from dvclive import Live

    # dvcyaml=False: metrics/plots are declared in the repo's dvc.yaml, not generated per run.
    # Not `with Live(...)`: its __exit__ calls `Live.end()` after an error or SIGTERM too, and
    # `end()` waits on a queue whose worker thread a signal during `next_step()` may have kept
    # from starting, forever (issue 20). Each `next_step()` has written the metrics so far, so a
    # failed run skips `end()`.
    live = (
        Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        if distributed.is_main_process()
        else None
    )
    for row in history:
        log_epoch(live, row)
    return live


def log_epoch(live, row: dict) -> None:
    """One DVCLive step with the row's metrics (nothing off rank 0, where `live` is None)."""
    if live is None:
        return
    for key, value in row.items():
        if key != "epoch":
            live.log_metric(key, value)
    live.next_step()


def print_epoch(live, row: dict, *, epochs: int, images_per_s: float, desc: str) -> None:
    """One line per epoch on rank 0 (where `live` is not None)."""
    if live is not None:
        print(
            f"{desc} epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} top-1 "
            f"{row['train_top1']:.2f}% | val loss {row['val_loss']:.4f} top-1 "
            f"{row['val_top1']:.2f}% | {images_per_s:.0f} img/s",
            flush=True,
        )
