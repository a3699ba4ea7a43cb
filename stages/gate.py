"""gate: pass or fail the release model against the FP32 reference; write reports/gate.json."""

import argparse
import sys
from pathlib import Path

from resnet_slim.errors import UserError, run_stage
from resnet_slim.gate import Evidence, accuracy_sentence, evaluate_gate, read_correctness
from resnet_slim.io import read_json, write_json
from resnet_slim.params import load_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--benchmark", default="reports/benchmark.json")
    parser.add_argument("--predictions", default="reports/predictions.csv",
                        help="per-image predictions from the benchmark (paired statistics)")
    parser.add_argument("--seeds", default="reports/seeds.json",
                        help="seed repeats (used when they cover 2+ seeds)")
    parser.add_argument("--out", default="reports/gate.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    g = params.gate

    try:
        bench = read_json(args.benchmark, what="benchmark results")
        seeds = read_json(args.seeds, what="seed repeats") if Path(args.seeds).is_file() else None
    except UserError as err:  # fail closed: never leave an older, passing gate.json behind
        write_json(args.out, {"passed": False, "release": g.release, "reference": g.reference,
                              "enforce": g.enforce, "checks": [], "failed": [str(err)],
                              "selection": None})
        raise
    models = bench.get("models") if isinstance(bench, dict) else None
    # problems with the evidence fail the accuracy check (recorded in gate.json), not the stage
    correct, correct_error = {}, None
    try:
        correct = read_correctness(args.predictions)
    except UserError as err:
        correct_error = str(err)
    evidence = Evidence(correct=correct, correct_error=correct_error, seeds=seeds, ci=params.benchmark,
                        malformed=correct_error is not None and Path(args.predictions).is_file())
    verdict = evaluate_gate(models if isinstance(models, dict) else {}, g, evidence)
    write_json(args.out, verdict)
    for check in verdict["checks"]:
        mark = "PASS" if check["passed"] else "FAIL"
        print(f"gate: {mark} {check['name']}: {check['measured']} {check['op']} {check['threshold']}"
              + (f" ({check['reason']})" if check["reason"] else ""))
        if check.get("ci"):
            print(f"gate:   {accuracy_sentence(check)}")
    if verdict["selection"]:
        print(f"gate: release auto -> '{verdict['release']}': {verdict['selection']['why']}")
    if verdict["passed"]:
        print(f"gate: release '{verdict['release']}' passed every check")
        return 0
    message = f"gate: release '{verdict['release']}' FAILED: " + "; ".join(verdict["failed"])
    if not g.enforce:
        print(message + " (gate.enforce is false: recorded, not enforced)")
        return 0
    print("error: " + message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
