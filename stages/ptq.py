"""ptq: onnxruntime post-training INT8 (static QDQ, calibrated) of an FP32 ONNX file: the baseline a
user gets without this pipeline."""

import argparse

from resnet_slim.errors import run_stage


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("fp32_onnx")
    parser.add_argument("int8_onnx")
    parser.add_argument("--dynamic-out", help="also write onnxruntime dynamic INT8 here")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    from resnet_slim.compress.quant import (
        calibration_images,
        quantize_dynamic_int8,
        quantize_static_int8,
        resolve_reduce_range,
    )
    from resnet_slim.data.loader import (
        normalized_split,
    )  # after parse_args: `--help` needs no torch
    from resnet_slim.params import load_params

    params = load_params(args.params)
    train_images, _ = normalized_split(args.data, "train")
    calibration = calibration_images(
        train_images, params.ptq.calibration_images, seed=params.base.seed
    )
    reduce_range = resolve_reduce_range(params.ptq.reduce_range)
    quantize_static_int8(
        args.fp32_onnx,
        args.int8_onnx,
        calibration,
        per_channel=params.ptq.per_channel,
        reduce_range=reduce_range,
    )
    print(
        f"ptq: {args.fp32_onnx} -> {args.int8_onnx} ({len(calibration)} calibration images, "
        f"reduce_range={reduce_range})"
    )
    if args.dynamic_out:
        quantize_dynamic_int8(args.fp32_onnx, args.dynamic_out)
        print(f"ptq: {args.fp32_onnx} -> {args.dynamic_out} (dynamic)")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
