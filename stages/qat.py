"""qat: quantization-aware training of an FP32 checkpoint (pruned or not) -> INT8 QDQ ONNX.

Calibrate the fake quants on training images, train with the shared loop, export (BN folded, int8
weights), and reject the file unless onnxruntime runs every conv as an int8 kernel and it gives the
PyTorch QAT model's class on qat.min_agreement of the test images. base.device / base.nproc apply
to the training as in every training stage (resnet_slim/train/distributed.py); rank 0 exports.
"""

import argparse

from resnet_slim.errors import run_stage


def quantize(args, params, device) -> None:
    from pathlib import Path

    from resnet_slim.checkpoints import save_checkpoint
    from resnet_slim.compress.qat import quantize_checkpoint
    from resnet_slim.errors import UserError
    from resnet_slim.io import write_json

    result = quantize_checkpoint(
        args.checkpoint,
        args.data,
        params.qat,
        params.base,
        device,
        opset=params.export.opset,
        onnx_path=args.onnx,
        live_dir=f"{args.reports}/live",
    )
    if result is None:
        return  # not rank 0: rank 0 writes the outputs, once
    model, arch, metrics = result
    write_json(f"{args.reports}/metrics.json", metrics)
    if metrics["problems"]:
        Path(args.onnx).unlink()
        raise UserError(f"{args.onnx}: QAT export rejected: {'; '.join(metrics['problems'])}")
    save_checkpoint(
        args.out, model=model, arch=arch, params=params.qat.model_dump(), metrics=metrics
    )
    print(
        f"qat: PyTorch top-1 {metrics['torch_top1']:.2f}%, ONNX top-1 "
        f"{metrics['onnx_top1']:.2f}%, {metrics['kernels']['int8_convs']} int8 convs "
        f"-> {args.onnx}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="FP32 checkpoint")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--onnx", required=True)
    parser.add_argument(
        "--out", required=True, help="QAT checkpoint (see resnet_slim/compress/qat.py)"
    )
    parser.add_argument("--reports", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from resnet_slim.params import load_params  # torch: after parse_args (fast --help)
    from resnet_slim.train.distributed import run_training_stage
    from resnet_slim.train.resume import resumable

    params = load_params(args.params)
    return run_training_stage(
        module="stages.qat",
        argv=argv,
        base=params.base,
        batch_sizes={"qat.batch_size": params.qat.batch_size},
        train=resumable(args.out, params, "qat", lambda device: quantize(args, params, device)),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
