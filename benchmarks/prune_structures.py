"""Which pruning structure buys the most accuracy per millisecond: the same teacher pruned by
today's MAC-ratio width pruning (L1 filter norm, `--mac-ratio`), and by prune.method latency with
structure width, depth and depth_width at the same latency budget, each fine-tuned alike, then
measured on this CPU (onnxruntime INT8 QDQ, 1 thread, the teacher in the same run) and scored on
the test split (drop vs the teacher with its paired 95% CI).

    python -m benchmarks.prune_structures --teacher models/teacher.pt --data data/prepared \
        --latency-table reports/latency_table.json [--params params.yaml] [--epochs 2] \
        [--out benchmarks/prune_structures.json]

The fine-tuning is prune.finetune of the params file with `--epochs` epochs (the pipeline's KD
setting, prune.kd_alpha, included); the budget is prune.latency.speedup. Takes the cores for
(1 + structures) x epochs of fine-tuning: run it when nothing else does.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from resnet_slim import stats  # noqa: E402
from resnet_slim.compress.latency_model import model_units, predict_ms  # noqa: E402
from resnet_slim.compress.prune import slim_prune_and_finetune  # noqa: E402
from resnet_slim.data.loader import load_meta  # noqa: E402
from resnet_slim.errors import UserError  # noqa: E402
from resnet_slim.hardware import has_int8_dot_product  # noqa: E402
from resnet_slim.io import read_json, write_json  # noqa: E402
from resnet_slim.measure.latency_table import latency_fingerprint, measure_model_ms  # noqa: E402
from resnet_slim.params import load_params  # noqa: E402
from resnet_slim.train import engine  # noqa: E402
from resnet_slim.train.models import load_model  # noqa: E402

STRUCTURES = ("mac_width", "width", "depth", "depth_width")


def prune_params(p, structure: str, epochs: int, mac_ratio: float):
    """prune.* for one arm: method latency with `structure`, or L1 filter pruning at a MAC ratio."""
    finetune = p.finetune.model_copy(update={"epochs": epochs})
    if structure == "mac_width":
        return p.model_copy(
            update={"method": "l1_filter", "ratio": mac_ratio, "finetune": finetune}
        )
    latency = p.latency.model_copy(update={"structure": structure})
    return p.model_copy(update={"method": "latency", "latency": latency, "finetune": finetune})


def test_correct(model, loader) -> torch.Tensor:
    logits, labels = engine.predict(model, loader)
    return (logits.argmax(1) == labels).numpy()


def timed_ms(model, size: int) -> dict:
    return {
        rt: measure_model_ms(model, size, runtime=rt, runs=30, repeats=9) for rt in ("fp32", "int8")
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--latency-table", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of every arm")
    parser.add_argument("--mac-ratio", type=float, default=0.5, help="mac_width: channels removed")
    parser.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES))
    parser.add_argument("--out", default="benchmarks/prune_structures.json")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise SystemExit("prune_structures: --epochs must be >= 1")
    params, table = load_params(args.params), read_json(args.latency_table, "latency table")
    size = load_meta(args.data)["image_size"]
    teacher, _ = load_model(args.teacher)
    test_loader = engine.eval_loader(args.data, "test", load_meta(args.data))
    teacher_correct = test_correct(teacher, test_loader)
    result = {
        "machine": latency_fingerprint(),
        "int8_dot_product": has_int8_dot_product(),
        "teacher": {"top1_test": 100 * teacher_correct.mean(), "ms": timed_ms(teacher, size)},
        "budget": f"teacher FP32 (the table's measured, else predicted) / "
        f"{params.prune.latency.speedup}",
        "finetune_epochs": args.epochs,
        "arms": {},
    }
    for structure in args.structures:
        p = prune_params(params.prune, structure, args.epochs, args.mac_ratio)
        with tempfile.TemporaryDirectory() as reports:
            try:
                pruned, _, metrics, _ = slim_prune_and_finetune(
                    teacher_path=args.teacher,
                    prepared_dir=args.data,
                    reports=reports,
                    p=p,
                    base=params.base,
                    device=torch.device("cpu"),
                    latency_table=table,
                )
            except UserError as err:  # e.g. width alone cannot reach the budget: a finding
                result["arms"][structure] = {"unreachable": str(err)}
                print(structure, "unreachable:", err, flush=True)
                write_json(args.out, result)
                continue
        try:
            predicted = predict_ms(model_units(pruned, size), table, "int8")
        except UserError:  # L1 widths are not in the table (it lists the fast ones only)
            predicted = None
        drop = stats.paired_drop(teacher_correct, test_correct(pruned, test_loader))
        result["arms"][structure] = {
            "top1_test": metrics["top1_test"],
            "drop_pp": drop["drop_pp"],
            "drop_ci": [drop["ci_low"], drop["ci_high"]],
            "macs_ratio": metrics["macs"]["ratio"],
            "blocks_removed": metrics.get("blocks_removed", 0),
            "predicted_int8_ms": predicted,
            "ms": timed_ms(pruned, size),
        }
        print(structure, json.dumps(result["arms"][structure]), flush=True)
        write_json(args.out, result)  # after every arm: a later failure keeps the finished ones
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
