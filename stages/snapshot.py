"""snapshot: freeze a run's results for review in git (not a pipeline stage).

    python -m stages.snapshot reports/cifar10-resnet56            # this workspace's last run
    python -m stages.snapshot reports/cifar10-resnet56 --root /path/to/another/workspace

Copies the report, gate verdict, benchmark, per-image predictions, training curves, the ONNX
files of the reference and of every gate candidate (up to --max-onnx-mb each), and writes
preprocess.json (see resnet_slim/report/snapshot.py). The directory is replaced as a whole.
"""

import argparse

from resnet_slim.errors import run_stage
from resnet_slim.report.snapshot import write_snapshot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("out", help="the snapshot directory, e.g. reports/cifar10-resnet56")
    parser.add_argument("--root", default=".", help="the workspace whose run is copied")
    parser.add_argument(
        "--max-onnx-mb",
        type=float,
        default=10.0,
        help="leave out larger ONNX files (named with sha256 in models/left_out.json)",
    )
    args = parser.parse_args(argv)
    written = write_snapshot(args.root, args.out, args.max_onnx_mb)
    print(f"snapshot: {len(written)} files in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
