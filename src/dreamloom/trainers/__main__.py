"""`python -m dreamloom.trainers RUN_DIR` (or under `accelerate launch -m` for several GPUs): train
a run directory that `dreamloom train`, the studio or the job queue made, from its latest
checkpoint, or from the start if it has none yet."""

import argparse
import sys

from ..shell import quiet_libraries, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamloom.trainers")
    parser.add_argument("run", help="run directory")
    args = parser.parse_args(argv)
    quiet_libraries()

    def train() -> int:
        from .run import train_run

        from ..rundir import main_process

        run, exports = train_run(args.run)
        if not main_process():  # the main process speaks for all
            return 0
        print(f"finished: {run.path}")
        for path in exports:
            print(f"export: {path}")
        return 0

    return run_command(train)


if __name__ == "__main__":
    sys.exit(main())
