"""qat: quantization-aware training of an FP32 checkpoint (pruned or not) -> INT8 QDQ ONNX.

Calibrate the fake quants on training images, train with the shared loop, export (BN folded, int8
weights), and reject the file unless onnxruntime runs every conv as an int8 kernel and its test
top-1 is within qat.max_top1_diff_pp of the PyTorch QAT model's.
"""

import argparse
from pathlib import Path

import torch

from resnet_slim import engine
from resnet_slim.bench import top1
from resnet_slim.data import load_meta, normalized_split, train_val_loaders
from resnet_slim.errors import UserError, run_stage
from resnet_slim.export import make_session
from resnet_slim.io import save_checkpoint, write_json
from resnet_slim.models import load_model
from resnet_slim.params import load_params
from resnet_slim.qat import (calibrate, export_qat_onnx, int8_kernel_report, prepare_qat_model,
                             qat_epoch_hook)
from resnet_slim.quant import calibration_images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="models/pruned.pt", help="FP32 checkpoint")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--onnx", default="models/qat_int8.onnx")
    parser.add_argument("--out", default="models/qat.pt", help="QAT checkpoint (see qat.py)")
    parser.add_argument("--reports", default="reports/qat")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p = params.qat

    engine.seed_everything(params.base.seed, params.base.threads)
    fp32, checkpoint = load_model(args.checkpoint,
                                  num_classes=len(load_meta(args.data)["class_names"]))
    model = prepare_qat_model(fp32, backend=p.backend)
    train_images, _ = normalized_split(args.data, "train")
    calibrate(model, torch.from_numpy(calibration_images(train_images, p.calibration_images,
                                                         seed=params.base.seed)))
    train_loader, val_loader, _ = train_val_loaders(args.data, batch_size=p.batch_size,
                                                    augment=params.base.augment, seed=params.base.seed)
    history = engine.fit(model, train_loader, val_loader, p,
                         loss_fn=engine.cross_entropy(p.label_smoothing),
                         live_dir=f"{args.reports}/live", desc="qat",
                         on_epoch_start=qat_epoch_hook(freeze_bn_epoch=p.freeze_bn_epoch,
                                                       freeze_observer_epoch=p.freeze_observer_epoch))

    images, labels = normalized_split(args.data, "test")
    batches = [(images[i:i + 256], labels[i:i + 256]) for i in range(0, len(images), 256)]
    torch_top1 = engine.evaluate(model, batches)["top1"]
    export_qat_onnx(model, args.onnx, image_size=images.shape[-1], opset=params.export.opset)
    onnx_top1 = top1(make_session(args.onnx, threads=params.base.threads), images, labels)
    kernels = int8_kernel_report(args.onnx)
    problems = []
    if not abs(onnx_top1 - torch_top1) <= p.max_top1_diff_pp:
        problems.append(f"ONNX top-1 {onnx_top1:.2f}% vs PyTorch QAT {torch_top1:.2f}% differ by "
                        f"more than qat.max_top1_diff_pp={p.max_top1_diff_pp}")
    if not kernels["all_convs_int8"]:
        problems.append(f"onnxruntime runs {kernels['float_convs']} conv(s) in float "
                        f"({kernels['int8_convs']} int8)")
    metrics = {"torch_top1": torch_top1, "onnx_top1": onnx_top1,
               "top1_diff_pp": onnx_top1 - torch_top1, "val_top1": history[-1]["val_top1"],
               "size_mb": Path(args.onnx).stat().st_size / 1e6, "kernels": kernels,
               "fp32_metrics": checkpoint.get("metrics", {}), "passed": not problems,
               "problems": problems}
    write_json(f"{args.reports}/metrics.json", metrics)
    if problems:
        Path(args.onnx).unlink()
        raise UserError(f"{args.onnx}: QAT export rejected: {'; '.join(problems)}")
    save_checkpoint(args.out, model=model, arch=checkpoint["arch"], params=p.model_dump(),
                    metrics=metrics)
    print(f"qat: PyTorch top-1 {torch_top1:.2f}%, ONNX top-1 {onnx_top1:.2f}%, "
          f"{kernels['int8_convs']} int8 convs -> {args.onnx}")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
