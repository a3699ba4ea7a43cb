"""report: reports/report.md, a self-contained reports/report.html and reports/plots/ from the
run."""

import argparse

from resnet_slim.errors import run_stage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reports", required=True, help="directory the other stages wrote")
    parser.add_argument("--benchmark", default=None, help="default: REPORTS/benchmark.json")
    parser.add_argument("--md", required=True)
    parser.add_argument("--html", required=True)
    parser.add_argument("--plots", required=True, help="figures + pareto.csv (replaced whole)")
    args = parser.parse_args(argv)
    from resnet_slim.report import report

    inputs = report.load_inputs(args.reports, args.params, args.benchmark)
    written = report.write_report(inputs, out_md=args.md, out_html=args.html, plots_dir=args.plots)
    print(
        f"report: release '{written['release']}', {len(written['models'])} models -> {args.md}, "
        f"{args.html}, {args.plots}/ ({', '.join(written['plots'])})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
