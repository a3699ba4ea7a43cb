"""qat: quantization-aware training of an FP32 checkpoint (pruned or not) -> INT8 QDQ ONNX.

Calibrate the fake quants on training images, train with the shared loop, export (BN folded, int8
weights), and reject the file unless onnxruntime runs every conv as an int8 kernel and it gives the
PyTorch QAT model's class on qat.min_agreement of the test images. base.device / base.nproc apply
to the training as in every training stage (resnet_slim/train/distributed.py); rank 0 exports.
"""

import argparse

from resnet_slim.errors import run_stage


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
    from resnet_slim.compress.qat import quantize_checkpoint
    from resnet_slim.params import load_params
    from resnet_slim.train.distributed import (
        run_training_stage,
    )  # torch: after parse_args (fast --help)
    from resnet_slim.train.resume import resumable

    params = load_params(args.params)
    return run_training_stage(
        module="stages.qat",
        argv=argv,
        base=params.base,
        batch_sizes={"qat.batch_size": params.qat.batch_size},
        train=resumable(
            args.out,
            params,
            "qat",
            lambda device: quantize_checkpoint(
                args.checkpoint,
                args.data,
                params,
                device,
                onnx_path=args.onnx,
                out=args.out,
                reports=args.reports,
            ),
        ),
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
