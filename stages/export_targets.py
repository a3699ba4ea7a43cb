"""export_targets: the release candidate on other runtimes (export.targets: openvino, tflite,
mindspore, tensorrt) and the teacher's peer baselines (benchmark.peers: OpenVINO FP32 and
OpenVINO + NNCF INT8), each checked against its reference on the test split and benchmarked."""

import argparse
import shutil
from functools import cache, partial
from pathlib import Path

import pandas as pd

from resnet_slim.bench import hardware_fingerprint
from resnet_slim.data import load_meta, normalized_split
from resnet_slim.errors import UserError, run_stage
from resnet_slim.io import atomic_path, write_json
from resnet_slim.models import load_model
from resnet_slim.params import load_params
from resnet_slim.quant import calibration_images
from resnet_slim.targets import (Unavailable, benchmark_openvino, benchmark_tflite,
                                 export_mindspore, export_openvino, export_tensorrt, export_tflite,
                                 measure_target, onnx_logits, quantize_openvino_nncf,
                                 torch_logits, unavailable_row)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher-onnx", default="models/teacher.onnx")
    parser.add_argument("--student", default="models/student.pt", help="FP32 student checkpoint")
    parser.add_argument("--student-onnx", default="models/student.onnx")
    parser.add_argument("--student-int8-onnx", default="models/student_qat_int8.onnx")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--models-out", default="models/targets")
    parser.add_argument("--out", default="reports/targets.json")
    parser.add_argument("--predictions", default="reports/targets_predictions.csv",
                        help="class predicted per test image, per measured target")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    targets, out = params.export.targets, Path(args.models_out)

    images, labels = normalized_split(args.data, "test")
    calibration = calibration_images(normalized_split(args.data, "train")[0],
                                     params.ptq.calibration_images, seed=params.base.seed)
    on_openvino = partial(benchmark_openvino, images=images, labels=labels, p=params.benchmark)
    on_litert = partial(benchmark_tflite, images=images, labels=labels, p=params.benchmark)
    check = dict(labels=labels, p=params.export)
    student_int8, teacher = args.student_int8_onnx, args.teacher_onnx
    artifacts = {name: out / name for name in ("student_qat_int8_openvino",
                                               "teacher_openvino_fp32", "teacher_openvino_nncf_int8")}
    artifacts["student_tflite_int8"] = out / "student_tflite_int8.tflite"
    rows = {}
    if "openvino" in targets:  # the INT8 release file itself; OpenVINO runs its QDQ pairs as int8
        rows["student_qat_int8_openvino"] = measure_target(
            lambda: export_openvino(student_int8, artifacts["student_qat_int8_openvino"]),
            on_openvino, lambda: onnx_logits(student_int8, images), int8=True,
            reference=f"{student_int8} on onnxruntime", target="openvino",
            role="release target", source=student_int8, **check)
    if "tflite" in targets:  # LiteRT's own INT8 route (PT2E static) from the FP32 student
        n_classes = len(load_meta(args.data)["class_names"])
        rows["student_tflite_int8"] = measure_target(
            lambda: export_tflite(args.student, calibration, artifacts["student_tflite_int8"]),
            on_litert, lambda: torch_logits(load_model(args.student, num_classes=n_classes)[0],
                                            images), int8=True,
            reference=f"{args.student} in PyTorch (FP32)", target="tflite",
            role="release target", source=args.student, **check)
    for target, name, export in (("mindspore", "student_mindspore_lite", export_mindspore),
                                 ("tensorrt", "student_tensorrt_fp16", export_tensorrt)):
        if target in targets:
            try:  # always raises here: no wheel / no GPU (README, "Deployment targets")
                export(args.student_onnx, out / name)
            except Unavailable as err:
                rows[name] = unavailable_row(str(err), target=target, role="release target",
                                             source=args.student_onnx)
    if params.benchmark.peers:  # what a user would pick instead of this pipeline
        teacher_logits = cache(partial(onnx_logits, teacher, images))  # used twice
        rows["teacher_openvino_fp32"] = measure_target(
            lambda: export_openvino(teacher, artifacts["teacher_openvino_fp32"]), on_openvino,
            teacher_logits, int8=False, reference=f"{teacher} on onnxruntime",
            target="openvino", role="peer", source=teacher, **check)
        rows["teacher_openvino_nncf_int8"] = measure_target(
            lambda: quantize_openvino_nncf(teacher, calibration,
                                           artifacts["teacher_openvino_nncf_int8"]),
            on_openvino, teacher_logits, int8=True, reference=f"{teacher} on onnxruntime",
            target="openvino", role="peer", source=teacher, **check)
    out.mkdir(parents=True, exist_ok=True)  # a DVC output even when no target was requested
    write_reports(rows, labels, args)

    failed = [name for name, row in rows.items()
              if row["status"] == "parity_failed" and row["role"] == "release target"]
    for name in failed:  # a release file that disagrees with its reference is not kept
        shutil.rmtree(artifacts[name]) if artifacts[name].is_dir() else artifacts[name].unlink()
    if failed:
        problems = "; ".join(f"{name}: {rows[name]['parity']['problems'][0]}" for name in failed)
        raise UserError(f"parity check failed ({problems}); see {args.out}")


def write_reports(rows: dict, labels, args) -> None:
    predictions = pd.DataFrame({"image": range(len(labels)), "label": labels.numpy()})
    for name, row in rows.items():
        if row["status"] == "unavailable":
            print(f"export_targets: {name:28s} unavailable: {row['reason']}")
            continue
        predictions[name] = row.pop("predictions")
        print(f"export_targets: {name:28s} {row['status']:13s} top-1 {row['top1']:6.2f}%  "
              f"p50 {row['p50_ms']:7.3f} ms ({row['p50_ms_all_cores']:.3f} ms on "
              f"{row['threads_all_cores']} cores)  {row['size_mb']:7.2f} MB")
    write_json(args.out, {"models": rows, "hardware": hardware_fingerprint()})
    with atomic_path(args.predictions) as tmp:
        predictions.to_csv(tmp, index=False)


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
