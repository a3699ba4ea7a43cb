"""export_targets: the release candidate on other runtimes (export.targets: openvino, tflite,
mindspore, tensorrt) and the teacher's peer baselines (benchmark.peers: OpenVINO FP32 and
OpenVINO + NNCF INT8), each checked against its reference on the test split and benchmarked."""

import argparse

from resnet_slim.errors import UserError, run_stage


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher-onnx", required=True)
    parser.add_argument("--student", required=True, help="FP32 student checkpoint")
    parser.add_argument("--student-onnx", required=True)
    parser.add_argument("--student-int8-onnx", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True)
    parser.add_argument("--models-out", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--predictions", required=True, help="class predicted per test image, per measured target"
    )
    args = parser.parse_args(argv)
    from resnet_slim.compress.quant import calibration_images
    from resnet_slim.data.loader import load_meta, normalized_split
    from resnet_slim.hardware import hardware_fingerprint
    from resnet_slim.io import atomic_path, write_json
    from resnet_slim.measure import target_bench
    from resnet_slim.params import load_params

    params = load_params(args.params)
    images, labels = normalized_split(args.data, "test")
    calibration = calibration_images(
        normalized_split(args.data, "train")[0],
        params.ptq.calibration_images,
        seed=params.base.seed,
    )
    rows, artifacts = target_bench.measure_targets(
        params.export.targets,
        peers=params.benchmark.peers,
        teacher_onnx=args.teacher_onnx,
        student=args.student,
        student_onnx=args.student_onnx,
        student_int8_onnx=args.student_int8_onnx,
        out_dir=args.models_out,
        images=images,
        labels=labels,
        calibration=calibration,
        num_classes=len(load_meta(args.data)["class_names"]),
        bench=params.benchmark,
        check=params.export,
    )
    predictions = target_bench.target_predictions_table(rows, labels)
    write_json(args.out, {"models": rows, "hardware": hardware_fingerprint()})
    with atomic_path(args.predictions) as tmp:
        predictions.to_csv(tmp, index=False)
    if problems := target_bench.remove_failed_release_files(rows, artifacts):
        raise UserError(f"parity check failed ({'; '.join(problems)}); see {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
