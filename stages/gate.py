"""gate: pass or fail the release model against the FP32 reference; write reports/gate.json.

Only evidence that traces back to the files on disk counts (resnet_slim/measure/evidence.py): the
model files, the test split and the predictions must be the ones benchmark.json was measured with.
"""

import argparse
import sys
from pathlib import Path

from resnet_slim.errors import UserError, one_line, run_stage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--benchmark", required=True, help="benchmark results (JSON)")
    parser.add_argument("--predictions", required=True, help="per-image predictions (pairing)")
    parser.add_argument("--seeds", required=True, help="seed repeats (used for 2+ base.seeds)")
    parser.add_argument("--data", required=True, help="prepared dataset: the test split judged")
    parser.add_argument("--out", required=True, help="the verdict (JSON)")
    parser.add_argument("--metrics", help="also write the headline metrics here (dvc metrics)")
    parser.add_argument("--teacher-summary", help="train_teacher's summary.json (reference origin)")
    args = parser.parse_args(argv)
    from resnet_slim.gate import gate
    from resnet_slim.io import read_json
    from resnet_slim.params import load_params

    params = load_params(args.params)
    try:
        bench = read_json(args.benchmark, what="benchmark results")
        seeds = read_json(args.seeds, what="seed repeats") if Path(args.seeds).is_file() else None
    except UserError as err:  # fail closed: never leave an older, passing gate.json behind
        gate.write_verdict(
            gate.unreadable_verdict(params.gate, err), {}, out=args.out, metrics=args.metrics
        )
        raise
    verdict = gate.judge(
        bench,
        seeds,
        params,
        benchmark=args.benchmark,
        predictions=args.predictions,
        prepared=args.data,
    )
    teacher = args.teacher_summary and read_json(args.teacher_summary, what="teacher summary")
    verdict["reference_origin"] = gate.reference_origin(teacher)
    written = gate.write_verdict(
        verdict, bench, out=args.out, metrics=args.metrics, ci=params.benchmark
    )
    print(f"gate: wrote {', '.join(written)}")
    for line in gate.log_lines(verdict):
        print(f"gate: {line}")
    if verdict["passed"]:
        return 0
    message = f"gate: release '{verdict['release']}' FAILED: " + "; ".join(verdict["failed"])
    if not params.gate.enforce:
        print(message + " (gate.enforce is false: recorded, not enforced)")
        return 0
    print("error: " + one_line(message), file=sys.stderr)  # a newline in a path: still one line
    return 1


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
