"""preset: run a compression preset (params/<name>.yaml) as a DVC experiment.

Not a pipeline stage: it validates the preset(s) over params.yaml, then runs `dvc exp run -S ...`.

    python -m stages.preset --list
    python -m stages.preset medium                          # run now
    python -m stages.preset light medium aggressive --queue # one queued experiment per preset
    python -m stages.preset cifar10-dev medium --print      # show the command only
    python -m stages.preset aggressive --set gate.enforce=false
"""

import argparse
import shlex
import subprocess
import sys

from resnet_slim.errors import run_stage
from resnet_slim.presets import available_presets, describe_preset, preset_commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("presets", nargs="*", help="preset names, applied in order")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--queue", action="store_true", help="queue: one experiment per preset")
    parser.add_argument("--combine", action="store_true", help="all presets in one experiment")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra dvc -S override, after the presets",
    )
    parser.add_argument("--print", action="store_true", help="print the dvc command(s) only")
    parser.add_argument("--list", action="store_true", help="list presets")
    args = parser.parse_args(argv)
    if args.list:
        for name in available_presets():
            print(f"{name:14s} {describe_preset(name)}")
        return 0
    commands = preset_commands(
        args.presets, args.params, args.set, combine=args.combine, queue=args.queue
    )  # all validated before any runs
    for command in commands:
        print("$ " + shlex.join(command), flush=True)
        if args.print:
            continue
        # this interpreter's DVC, so the venv's dvc runs even when it is not on PATH
        returncode = subprocess.run([sys.executable, "-m", *command], check=False).returncode
        if returncode != 0:
            return returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
