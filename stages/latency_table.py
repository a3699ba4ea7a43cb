"""latency_table: time, on this CPU with onnxruntime (FP32 and INT8 QDQ, benchmark.threads), every
building block a latency-aware pruning of the teacher can produce: the stem, the head and each
residual block at each fast INT8 inner width (prune.latency.width_steps of them). The table prices
prune.method latency and predicts every benchmarked model's latency (checked there against the
measured one). It records the CPU and onnxruntime it was measured with; timings of blocks already
measured on the same CPU and runtime are reused from --cache-dir. The whole teacher is timed too:
its measured FP32 time is the latency budget's reference."""

import argparse

from resnet_slim.errors import run_stage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--out", required=True, help="the table (JSON)")
    parser.add_argument("--cache-dir", default=None, help="timings reused across runs")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    # imported after parse_args: torch takes seconds, --help should not
    from resnet_slim.compress.latency_model import table_units_for
    from resnet_slim.compress.latency_prune import block_widths
    from resnet_slim.compress.quant import resolve_reduce_range
    from resnet_slim.data.loader import load_meta
    from resnet_slim.io import write_json
    from resnet_slim.measure.latency_table import measure_latency_table, measure_model_ms
    from resnet_slim.params import load_params
    from resnet_slim.train.models import load_model

    params = load_params(args.params)
    meta = load_meta(args.data)
    teacher, _ = load_model(args.teacher, num_classes=len(meta["class_names"]))
    steps = params.prune.latency.width_steps
    specs = table_units_for(
        teacher, meta["image_size"], lambda spec: block_widths(spec, steps=steps)
    )
    table = measure_latency_table(
        specs,
        threads=params.benchmark.threads,
        reduce_range=resolve_reduce_range(params.ptq.reduce_range),
        cache_dir=args.cache_dir,
    )
    # the budget's reference: the whole teacher as measured, not only as its units predict it
    table["teacher_measured_ms"] = {
        runtime: measure_model_ms(
            teacher,
            meta["image_size"],
            runtime=runtime,
            threads=params.benchmark.threads,
            reduce_range=table["reduce_range"],
        )
        for runtime in ("fp32", "int8")
    }
    write_json(args.out, table)
    print(f"latency_table: {len(table['units'])} units timed (FP32 and INT8) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
