"""torch_ptq: PyTorch eager static INT8 PTQ of an FP32 checkpoint, measured in PyTorch (top-1,
batch-1 latency, size): the in-framework baseline next to onnxruntime's PTQ and our QAT."""

import argparse

from resnet_slim.errors import run_stage


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="FP32 checkpoint")
    parser.add_argument("--out", required=True, help="report (JSON)")
    parser.add_argument("--backend", help="torch quantized engine (default: qat.backend)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    import torch  # after parse_args: `--help` needs no torch

    from resnet_slim.compress.qat import eager_ptq_int8
    from resnet_slim.compress.quant import calibration_images
    from resnet_slim.data.loader import load_meta, normalized_split
    from resnet_slim.io import write_json
    from resnet_slim.measure.bench import (
        process_peak_rss_mb,
        state_dict_mb,
        torch_latency_ms,
        torch_top1,
    )
    from resnet_slim.params import load_params
    from resnet_slim.train.models import load_model

    params = load_params(args.params)
    backend, b = args.backend or params.qat.backend, params.benchmark
    # not engine.seed_everything: its deterministic mode only adds warnings about quantized ops
    torch.manual_seed(params.base.seed)
    torch.set_num_threads(params.base.threads)
    fp32, _ = load_model(args.checkpoint, num_classes=len(load_meta(args.data)["class_names"]))
    train_images, _ = normalized_split(args.data, "train")
    calibration = torch.from_numpy(
        calibration_images(train_images, params.ptq.calibration_images, seed=params.base.seed)
    )
    quantized = eager_ptq_int8(fp32, calibration, backend=backend)
    images, labels = normalized_split(args.data, "test")
    result = {
        "top1": torch_top1(quantized, images, labels),
        "fp32_top1": torch_top1(fp32, images, labels),
        "n_test": int(len(labels)),
        "backend": backend,
        "n_calibration": int(len(calibration)),
        "size_mb": state_dict_mb(quantized),
        **torch_latency_ms(
            quantized, images[:1], threads=b.threads, warmup=b.warmup, runs=b.timed_runs
        ),
        "threads": b.threads,
    }
    if (peak_rss_mb := process_peak_rss_mb()) is not None:  # data, FP32 model too: an upper bound
        result["process_peak_rss_mb"] = peak_rss_mb
    write_json(args.out, result)
    print(
        f"torch_ptq: {backend} top-1 {result['top1']:.2f}% (FP32 {result['fp32_top1']:.2f}%), "
        f"p50 {result['p50_ms']:.3f} ms, {result['size_mb']:.2f} MB -> {args.out}"
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
