"""`python -m dreamloom.trainers RUN_DIR` (or under `accelerate launch -m` for several GPUs):
continue a run directory that `dreamloom train` or the studio made, from its latest checkpoint."""

import argparse
import sys

from ..cli import quiet_libraries
from ..errors import DreamloomError, TrainingStopped
from .run import resume_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamloom.trainers")
    parser.add_argument("run", help="run directory")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        resume_run(args.run)
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        return TrainingStopped.exit_code
    except DreamloomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
