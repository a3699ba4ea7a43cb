"""export: checkpoint -> ONNX (dynamic batch), then PyTorch-vs-onnxruntime parity on the test
split."""

import argparse
from pathlib import Path

from resnet_slim.errors import UserError, run_stage


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("onnx")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True)
    parser.add_argument("--report", required=True, help="parity report (JSON)")
    args = parser.parse_args(argv)
    from resnet_slim.compress.export import check_parity, export_onnx, make_session, parity
    from resnet_slim.data.loader import (
        load_meta,
        normalized_split,
    )  # after parse_args: `--help` is fast
    from resnet_slim.io import write_json
    from resnet_slim.params import load_params
    from resnet_slim.train.models import load_model

    p = load_params(args.params).export
    meta = load_meta(args.data)
    model, checkpoint = load_model(  # the record bounded at the size it will be exported at
        args.checkpoint, num_classes=len(meta["class_names"]), image_size=meta["image_size"]
    )
    images, _ = normalized_split(args.data, "test")
    export_onnx(model, args.onnx, image_size=images.shape[-1], opset=p.opset)
    result = parity(model, make_session(args.onnx), images)
    problems = check_parity(
        result, min_top1_agreement=p.min_top1_agreement, max_abs_diff=p.max_abs_diff
    )
    write_json(args.report, {**result, "passed": not problems, "problems": problems})
    if problems:
        Path(args.onnx).unlink()
        raise UserError(f"{args.onnx}: parity check failed: {'; '.join(problems)}")
    print(
        f"export: {args.onnx} top-1 agreement {result['top1_agreement']:.4f}, "
        f"max |diff| {result['max_abs_diff']:.2e}"
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
