"""Stage `check`: the whole params.yaml, checked before any other stage does work.

Every stage depends on this stage's output, so DVC runs it first and stops at
its failure, before it deletes any other stage's outputs. The output's content
is the same for every valid params.yaml, so a passing check never makes the
stages after it look changed. Inside a failed `dvc exp run` it also puts
params.yaml back (captioning.params_restore).
"""

import argparse
import json
import sys

from captioning.atomic_files import write_if_changed
from captioning.config import SECTIONS, ConfigError, check_params, read_params
from captioning.errors import run_stage
from captioning.params_restore import in_experiment, restore_after_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--lock", default="dvc.lock", help="where the last passing check is")
    parser.add_argument("--out", required=True, help="the marker every stage depends on")
    args = parser.parse_args()
    problems = check_params(read_params(args.params))
    if problems:
        if in_experiment():
            restored = restore_after_experiment(args.params, args.lock, "check")
            if restored:
                print(
                    f"check: this experiment did not run; {args.params} is back as it was "
                    f"({', '.join(restored)} restored)",
                    file=sys.stderr,
                )
        raise ConfigError("\n".join(problems))
    marker = {"params": args.params, "checked_sections": sorted(SECTIONS)}
    write_if_changed(args.out, json.dumps(marker, indent=2) + "\n")
    print(f"check: {args.params} is valid ({len(SECTIONS)} sections)")


if __name__ == "__main__":
    run_stage(main)
