"""benchmark: every ONNX model in benchmark.models on onnxruntime CPU -> benchmark.json, a table
and per-image predictions, replaced together (benchmark.json last, recording the others' sha256).

benchmark.json also records the sha256 of each model file and of the test split, and predictions
carry the manifest's image ids: the gate traces every number back to them (resnet_slim/evidence.py).
"""

import argparse
from pathlib import Path

import pandas as pd

from resnet_slim.bench import (benchmark_model, hardware_fingerprint, has_int8_dot_product,
                               target_predictions, target_rows, torch_rows)
from resnet_slim.data import load_meta, normalized_split
from resnet_slim.errors import UserError, run_stage
from resnet_slim.evidence import test_ids, test_split_record
from resnet_slim.io import sha256_file, write_together
from resnet_slim.params import load_params
from resnet_slim.roofline import conv_peak_gmacs, count_macs, efficiency, is_quantized


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", default="models",
                        help="where the ONNX file of each benchmark.models name is: <dir>/<name>.onnx")
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
    if not p.models:
        raise UserError(f"{args.params}: benchmark.models is empty; list the ONNX models to measure")

    images, labels = normalized_split(args.data, "test")
    num_classes = len(load_meta(args.data)["class_names"])
    split = test_split_record(args.data)  # before measuring: a split changed meanwhile is refused
    results = {}
    predictions = pd.DataFrame({"image": test_ids(args.data, labels.numpy()), "label": labels.numpy()})
    for name in p.models:
        path = (Path(args.models_dir) / f"{name}.onnx").as_posix()
        results[name] = {"file": path, "runtime": "onnxruntime",
                         **benchmark_model(path, images, labels, p, num_classes=num_classes)}
        predictions[name] = results[name].pop("predictions")
        r = results[name]
        print(f"benchmark: {name:24s} top-1 {r['top1']:6.2f}% [{r['top1_ci_low']:.1f}, "
              f"{r['top1_ci_high']:.1f}]  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
              f"{r['size_mb']:7.2f} MB  peak RSS {r['peak_rss_mb']:.0f} MB")
    results.update(torch_rows(args.torch_results, p))  # PyTorch eager INT8, measured by torch_ptq
    unavailable = {}
    if args.targets:  # measured by export_targets in their own runtimes, same split and settings
        rows, unavailable = target_rows(args.targets)
        results.update(rows)
        if args.targets_predictions:
            for name, column in target_predictions(args.targets_predictions, labels.numpy()).items():
                predictions[name] = column
    for r in results.values():  # what each row was measured from (the ONNX rows have it already)
        if "sha256" not in r and isinstance(r.get("file"), str) and Path(r["file"]).is_file():
            r["sha256"] = sha256_file(r["file"])
    summary = {"models": results, "unavailable_targets": unavailable, "test_split": split,
               "hardware": hardware_fingerprint()}
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
    if test_split_record(args.data) != split:
        raise UserError(f"{args.data}: the test split changed while it was being benchmarked; re-run")
    table = pd.DataFrame.from_dict(results, orient="index").drop(columns=["onnx_ops", "parity"],
                                                                  errors="ignore")
    # interrupted part-way, the InterruptedWrite says exactly what was replaced (run_stage prints it)
    written = write_together({
        "predictions": (args.predictions, lambda tmp: predictions.to_csv(tmp, index=False)),
        "table": (args.table, lambda tmp: table.round(4).to_csv(tmp, index_label="model"))},
        record=args.out, content=summary)
    print(f"benchmark: wrote {', '.join(map(str, written))} (the last records the sha256 of the "
          f"others and of every model file)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
