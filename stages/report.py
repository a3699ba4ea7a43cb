"""report: reports/report.md, a self-contained reports/report.html and reports/plots/ from the run."""

import argparse

from resnet_slim.errors import run_stage
from resnet_slim.report import write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reports", default="reports", help="directory the other stages wrote")
    parser.add_argument("--benchmark", default=None, help="default: REPORTS/benchmark.json")
    parser.add_argument("--md", default="reports/report.md")
    parser.add_argument("--html", default="reports/report.html")
    parser.add_argument("--plots", default="reports/plots", help="figures + pareto.csv (replaced whole)")
    args = parser.parse_args(argv)
    written = write_report(args.reports, args.params, out_md=args.md, out_html=args.html,
                           plots_dir=args.plots, benchmark=args.benchmark)
    print(f"report: release '{written['release']}', {len(written['models'])} models -> {args.md}, "
          f"{args.html}, {args.plots}/ ({', '.join(written['plots'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
