"""benchmark: every ONNX model on onnxruntime CPU -> one JSON per model + a combined table."""

import argparse
from pathlib import Path

import pandas as pd

from resnet_slim.bench import (accuracy_ci_from_counts, benchmark_model, hardware_fingerprint,
                               has_int8_dot_product)
from resnet_slim.data import normalized_split
from resnet_slim.errors import UserError, run_stage
from resnet_slim.io import atomic_path, read_json, write_json
from resnet_slim.params import load_params
from resnet_slim.roofline import conv_peak_gmacs, count_macs, efficiency, is_quantized


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", help="ONNX files; each is named by its file stem")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="reports/benchmark.json")
    parser.add_argument("--table", default="reports/benchmark.csv")
    parser.add_argument("--predictions", default="reports/predictions.csv",
                        help="class predicted per test image, per model (for paired statistics)")
    parser.add_argument("--targets", help="export_targets results (other runtimes, peer baselines)")
    parser.add_argument("--targets-predictions", help="their per-image predictions")
    parser.add_argument("--torch-results", nargs="*", default=[],
                        help="torch_ptq reports to list beside the ONNX models (measured in PyTorch)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p = params.benchmark

    images, labels = normalized_split(args.data, "test")
    results = {}
    predictions = pd.DataFrame({"image": range(len(labels)), "label": labels.numpy()})
    for path in args.models:
        name = Path(path).stem
        results[name] = {"file": path, "runtime": "onnxruntime",
                         **benchmark_model(path, images, labels, p)}
        predictions[name] = results[name].pop("predictions")
        r = results[name]
        print(f"benchmark: {name:24s} top-1 {r['top1']:6.2f}% [{r['top1_ci_low']:.1f}, "
              f"{r['top1_ci_high']:.1f}]  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
              f"{r['size_mb']:7.2f} MB  peak RSS {r['peak_rss_mb']:.0f} MB")
    for path in args.torch_results:  # PyTorch eager INT8: the in-framework baseline
        report = read_json(path, what="torch_ptq report")
        results[f"{Path(path).stem}_torch_eager_int8"] = {
            "file": path, "runtime": "pytorch", "top1": report.get("top1"),
            **accuracy_ci_from_counts(report.get("top1"), report.get("n_test"), p),
            "n_test": report.get("n_test"), "size_mb": report.get("size_mb"),
            **{k: report.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "threads")},
            "peak_rss_mb": report.get("process_peak_rss_mb")}
    unavailable = {}
    if args.targets:  # measured by export_targets in their own runtimes, same split and settings
        targets = read_json(args.targets, what="deployment targets").get("models") or {}
        for name, row in targets.items():
            if isinstance(row, dict) and row.get("status") == "unavailable":
                unavailable[name] = {k: row.get(k) for k in ("target", "role", "source", "reason")}
            elif isinstance(row, dict):
                results[name] = row
        if args.targets_predictions:
            extra = pd.read_csv(args.targets_predictions)
            if len(extra) != len(predictions) or (extra["label"].to_numpy() != predictions["label"].to_numpy()).any():
                raise UserError(f"{args.targets_predictions}: predictions are for another test split; "
                                f"re-run export_targets")
            for name in extra.columns.drop(["image", "label"], errors="ignore"):
                predictions[name] = extra[name]
    summary = {"models": results, "unavailable_targets": unavailable, "hardware": hardware_fingerprint()}
    if p.roofline:  # how far each model is from this CPU's conv throughput
        reduce_range = params.ptq.reduce_range
        peak = conv_peak_gmacs(threads=p.threads, reduce_range=(
            not has_int8_dot_product() if reduce_range == "auto" else reduce_range))
        for name, r in results.items():
            if r.get("runtime") == "onnxruntime":
                kind = "int8" if is_quantized(r.get("onnx_ops")) else "fp32"
                r.update(efficiency(count_macs(r["file"]), r["p50_ms"], peak[f"{kind}_gmacs"]),
                         peak_kind=kind)
        summary["roofline"] = peak
        print(f"benchmark: conv peak {peak['fp32_gmacs']:.1f} GMAC/s FP32, {peak['int8_gmacs']:.1f} "
              f"GMAC/s INT8 ({p.threads} thread)")
    write_json(args.out, summary)
    with atomic_path(args.predictions) as tmp:
        predictions.to_csv(tmp, index=False)
    table = pd.DataFrame.from_dict(results, orient="index").drop(columns=["onnx_ops", "parity"],
                                                                  errors="ignore")
    with atomic_path(args.table) as tmp:
        table.round(4).to_csv(tmp, index_label="model")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
