"""compare_experiments: DVC experiments side by side (changed params, release metrics, gate).

Not a pipeline stage: run it after `dvc exp run` sweeps. It only reads (`dvc exp show --json`).

    python -m stages.compare_experiments            # this commit's experiments
    python -m stages.compare_experiments -A --md    # every commit, as a Markdown table
    python -m stages.compare_experiments --json saved.json
"""

import argparse
import json
from pathlib import Path

from resnet_slim.errors import UserError, run_stage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--json", type=Path, help="parse saved `dvc exp show --json` output instead"
    )
    parser.add_argument("-A", "--all-commits", action="store_true", help="passed to dvc exp show")
    parser.add_argument("-n", "--num", type=int, help="passed to dvc exp show (last N commits)")
    parser.add_argument("--all-params", action="store_true", help="every param, not only changed")
    parser.add_argument("--md", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    import pandas as pd  # after parse_args: `--help` needs no pandas

    from resnet_slim.report.experiments import comparison_table, run_exp_show
    from resnet_slim.report.render import markdown_table

    if args.json:
        try:
            entries = json.loads(args.json.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{args.json}: not readable JSON ({err})") from None
    else:
        extra = (["-A"] if args.all_commits else []) + (["-n", str(args.num)] if args.num else [])
        entries = run_exp_show(extra)
    table = comparison_table(entries, all_params=args.all_params)
    if table.empty:
        print("no experiments")
    elif args.md:
        print(markdown_table(table))
    else:
        with pd.option_context("display.width", 250, "display.max_columns", None):
            print(table.to_string(index=False, na_rep="–"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
