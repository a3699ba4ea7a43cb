"""benchmark: every ONNX model on onnxruntime CPU -> one JSON per model + a combined table."""

import argparse
from pathlib import Path

import pandas as pd

from resnet_slim.bench import benchmark_model, hardware_fingerprint
from resnet_slim.data import normalized_split
from resnet_slim.errors import run_stage
from resnet_slim.io import atomic_path, read_json, write_json
from resnet_slim.params import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", help="ONNX files; each is named by its file stem")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="reports/benchmark.json")
    parser.add_argument("--table", default="reports/benchmark.csv")
    parser.add_argument("--torch-results", nargs="*", default=[],
                        help="torch_ptq reports to list beside the ONNX models (measured in PyTorch)")
    args = parser.parse_args(argv)
    p = load_params(args.params).benchmark

    images, labels = normalized_split(args.data, "test")
    results = {}
    for path in args.models:
        name = Path(path).stem
        results[name] = {"file": path, "runtime": "onnxruntime",
                         **benchmark_model(path, images, labels, p)}
        r = results[name]
        print(f"benchmark: {name:24s} top-1 {r['top1']:6.2f}%  p50 {r['p50_ms']:7.3f} ms  "
              f"p99 {r['p99_ms']:7.3f} ms  {r['size_mb']:7.2f} MB  peak RSS {r['peak_rss_mb']:.0f} MB")
    for path in args.torch_results:  # PyTorch eager INT8: the in-framework baseline
        report = read_json(path, what="torch_ptq report")
        results[f"{Path(path).stem}_torch_eager_int8"] = {
            "file": path, "runtime": "pytorch", "top1": report.get("top1"),
            "n_test": report.get("n_test"), "size_mb": report.get("size_mb"),
            **{k: report.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "threads")},
            "peak_rss_mb": report.get("process_peak_rss_mb")}
    write_json(args.out, {"models": results, "hardware": hardware_fingerprint()})
    table = pd.DataFrame.from_dict(results, orient="index").drop(columns=["onnx_ops"])
    with atomic_path(args.table) as tmp:
        table.round(4).to_csv(tmp, index_label="model")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
