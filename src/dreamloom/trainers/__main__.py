"""`python -m dreamloom.trainers RUN_DIR [--resume]` (or under `accelerate launch -m`): train a
run directory that `dreamloom train` or the studio prepared."""

import argparse
import sys

from ..cli import quiet_libraries
from ..errors import DreamloomError
from ..jobs import RunDir
from .loop import train


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamloom.trainers")
    parser.add_argument("run", help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args()
    quiet_libraries()
    try:
        train(RunDir.open(args.run), resume=args.resume)
    except DreamloomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
