"""torch_ptq: PyTorch eager static INT8 PTQ of an FP32 checkpoint, measured in PyTorch (top-1,
batch-1 latency, size): the in-framework baseline next to onnxruntime's PTQ and our QAT."""

import argparse
import io
from pathlib import Path

import torch

from resnet_slim import engine
from resnet_slim.data import load_meta, normalized_split
from resnet_slim.errors import run_stage
from resnet_slim.io import write_json
from resnet_slim.models import load_model
from resnet_slim.params import load_params
from resnet_slim.qat import eager_ptq_int8, torch_latency_ms
from resnet_slim.quant import calibration_images


def _top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    batches = [(images[i:i + 256], labels[i:i + 256]) for i in range(0, len(images), 256)]
    return engine.evaluate(model, batches)["top1"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="FP32 checkpoint")
    parser.add_argument("--out", help="report (default reports/torch_ptq/<checkpoint stem>.json)")
    parser.add_argument("--backend", help="torch quantized engine (default: qat.backend)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    out = args.out or f"reports/torch_ptq/{Path(args.checkpoint).stem}.json"
    backend = args.backend or params.qat.backend

    # not engine.seed_everything: its deterministic mode only adds warnings about quantized ops
    torch.manual_seed(params.base.seed)
    torch.set_num_threads(params.base.threads)
    fp32, checkpoint = load_model(args.checkpoint,
                                  num_classes=len(load_meta(args.data)["class_names"]))
    train_images, _ = normalized_split(args.data, "train")
    calibration = torch.from_numpy(calibration_images(train_images, params.ptq.calibration_images,
                                                      seed=params.base.seed))
    quantized = eager_ptq_int8(fp32, calibration, backend=backend)
    images, labels = normalized_split(args.data, "test")
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    b = params.benchmark
    result = {"top1": _top1(quantized, images, labels), "fp32_top1": _top1(fp32, images, labels),
              "n_test": int(len(labels)), "backend": backend,
              "n_calibration": int(len(calibration)), "size_mb": len(buffer.getvalue()) / 1e6,
              **torch_latency_ms(quantized, images[:1], threads=b.threads, warmup=b.warmup,
                                 runs=b.runs), "threads": b.threads}
    status = Path("/proc/self/status")
    if status.is_file():  # this whole process (data, FP32 model too): an upper bound
        line = next(l for l in status.read_text().splitlines() if l.startswith("VmHWM"))
        result["process_peak_rss_mb"] = int(line.split()[1]) / 1024.0
    write_json(out, result)
    print(f"torch_ptq: {backend} top-1 {result['top1']:.2f}% (FP32 {result['fp32_top1']:.2f}%), "
          f"p50 {result['p50_ms']:.3f} ms, {result['size_mb']:.2f} MB -> {out}")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
