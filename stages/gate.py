"""gate: pass or fail the release model against the FP32 reference; write reports/gate.json.

Only evidence that traces back to the files on disk counts (resnet_slim/evidence.py): the model
files, the test split and the predictions must be the ones benchmark.json was measured with.
"""

import argparse
import json
import sys
from pathlib import Path

from resnet_slim import evidence as chain_of
from resnet_slim.errors import UserError, one_line, run_stage
from resnet_slim.gate import Evidence, accuracy_sentence, evaluate_gate, reference_origin
from resnet_slim.io import read_json, write_json, write_together
from resnet_slim.metrics import headline_metrics
from resnet_slim.params import load_params


def write_verdict(verdict: dict, models: dict, *, out: str, metrics: str | None) -> list[str]:
    """gate.json; with `metrics`, the headline metrics too, replaced together (gate.json last)."""
    if metrics is None:
        write_json(out, verdict)
        return [out]
    headline = json.dumps(headline_metrics(verdict, models), indent=2) + "\n"
    return [str(path) for path in write_together(
        {"metrics": (metrics, lambda tmp: tmp.write_text(headline))}, record=out, content=verdict)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--benchmark", default="reports/benchmark.json")
    parser.add_argument("--predictions", default="reports/predictions.csv",
                        help="per-image predictions from the benchmark (paired statistics)")
    parser.add_argument("--seeds", default="reports/seeds.json",
                        help="seed repeats (used when base.seeds asks for 2+ seeds and they match)")
    parser.add_argument("--data", default="data/prepared",
                        help="prepared dataset: the test split the predictions must cover")
    parser.add_argument("--out", default="reports/gate.json")
    parser.add_argument("--metrics", help="also write the headline metrics here (dvc metrics)")
    parser.add_argument("--teacher-summary", help="train_teacher's summary.json: where the "
                        "reference came from (imported file and sha256, or trained here)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    g = params.gate

    try:
        bench = read_json(args.benchmark, what="benchmark results")
        seeds = read_json(args.seeds, what="seed repeats") if Path(args.seeds).is_file() else None
    except UserError as err:  # fail closed: never leave an older, passing gate.json behind
        write_verdict({"passed": False, "release": g.release, "reference": g.reference,
                       "enforce": g.enforce, "checks": [], "failed": [str(err)], "selection": None},
                      {}, out=args.out, metrics=args.metrics)
        raise
    models = bench.get("models") if isinstance(bench, dict) else None
    models = models if isinstance(models, dict) else {}
    # problems with the evidence fail the release's checks (recorded in gate.json), not the stage
    names = [g.reference, *(g.candidates if g.release == "auto" else [g.release])]
    chain = chain_of.verify(bench, names=names, benchmark=args.benchmark,
                            predictions=args.predictions, prepared=args.data)
    seeds, seeds_note = chain_of.seed_evidence(seeds, base=params.base, bench=bench, names=names)
    evidence = Evidence(correct=chain.correct, correct_error=chain.correct_error, seeds=seeds,
                        ci=params.benchmark, malformed=chain.predictions_broken,
                        problems=chain.problems, model_problems=chain.model_problems)
    verdict = evaluate_gate(models, g, evidence)
    verdict["evidence"] = {"problems": chain.problems, "models": chain.model_problems,
                           "n_test": chain.n_test}
    verdict["notes"] = [seeds_note] if seeds_note else []
    summary = read_json(args.teacher_summary, what="teacher summary") if args.teacher_summary else None
    verdict["reference_origin"] = reference_origin(summary)
    written = write_verdict(verdict, models, out=args.out, metrics=args.metrics)
    print(f"gate: wrote {', '.join(written)}")
    for note in verdict["notes"]:
        print(f"gate: note: {note}")
    if origin := verdict["reference_origin"].get("file"):
        print(f"gate: reference '{g.reference}' imported from {origin} (sha256 "
              f"{verdict['reference_origin']['sha256'][:12]}...)")
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
    print("error: " + one_line(message), file=sys.stderr)  # a newline in a path: still one line
    return 1


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
