"""gate: pass or fail the release model against the FP32 reference; write reports/gate.json."""

import argparse
import sys

from resnet_slim.errors import UserError, run_stage
from resnet_slim.gate import evaluate_gate
from resnet_slim.io import read_json, write_json
from resnet_slim.params import load_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--benchmark", default="reports/benchmark.json")
    parser.add_argument("--out", default="reports/gate.json")
    args = parser.parse_args(argv)
    g = load_params(args.params).gate

    try:
        bench = read_json(args.benchmark, what="benchmark results")
    except UserError as err:  # fail closed: never leave an older, passing gate.json behind
        write_json(args.out, {"passed": False, "release": g.release, "reference": g.reference,
                              "enforce": g.enforce, "checks": [], "failed": [str(err)],
                              "selection": None})
        raise
    models = bench.get("models") if isinstance(bench, dict) else None
    verdict = evaluate_gate(models if isinstance(models, dict) else {}, g)
    write_json(args.out, verdict)
    for check in verdict["checks"]:
        mark = "PASS" if check["passed"] else "FAIL"
        print(f"gate: {mark} {check['name']}: {check['measured']} {check['op']} {check['threshold']}"
              + (f" ({check['reason']})" if check["reason"] else ""))
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
