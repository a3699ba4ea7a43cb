"""benchmark: every ONNX model in benchmark.models on onnxruntime CPU -> benchmark.json, a table
and per-image predictions, replaced together (benchmark.json last, recording the others' sha256).

benchmark.json also records the sha256 of each model file and of the test split, and predictions
carry the manifest's image ids: the gate traces every number back to them
(resnet_slim/measure/evidence.py).
"""

import argparse

from resnet_slim.errors import run_stage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", required=True, help="<dir>/<name>.onnx per model name")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--predictions", required=True, help="class per test image, per model")
    parser.add_argument("--targets", help="export_targets results (other runtimes, peer baselines)")
    parser.add_argument("--targets-predictions", help="their per-image predictions")
    parser.add_argument("--torch-results", nargs="*", default=[], help="torch_ptq reports")
    parser.add_argument("--latency-table", help="check its predictions against the measurements")
    args = parser.parse_args(argv)
    from resnet_slim.io import read_json
    from resnet_slim.measure import bench_stage
    from resnet_slim.measure.targets import (
        open_target_session,
    )  # OpenVINO / LiteRT rows: timed here too
    from resnet_slim.params import load_params

    params = load_params(args.params)
    summary, per_image, peak = bench_stage.run_benchmark(
        args.models_dir,
        args.data,
        params.benchmark,
        params.ptq,
        targets=args.targets,
        targets_predictions=args.targets_predictions,
        torch_results=args.torch_results,
        open_other=open_target_session,
        latency_table=(
            read_json(args.latency_table, "latency table") if args.latency_table else None
        ),
    )
    written = bench_stage.write_benchmark(
        summary, per_image, out=args.out, table=args.table, predictions=args.predictions
    )
    if "latency_model" in summary:
        check = summary["latency_model"]
        worst = check["max_abs_error"]
        print(
            f"benchmark: latency table predictions within {100 * worst:.1f} % of the measured p50 "
            f"({len(check['errors'])} models)"
            if worst is not None
            else "benchmark: no model the latency table describes"
        )
    if peak is not None:
        print(
            f"benchmark: conv peak {peak['fp32_gmacs']:.1f} GMAC/s FP32, "
            f"{peak['int8_gmacs']:.1f} GMAC/s INT8 ({peak['threads']} thread)"
        )
    print(
        f"benchmark: wrote {', '.join(map(str, written))} (the last records the sha256 of the "
        f"others and of every model file)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
