"""Ray job entrypoint for `raypipe extract`: trait vectors, computed in the job driver process."""

import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the repo: import the raypipe beside this file
# (under `ray job submit --working-dir .`, the job's copy; Ray puts it on workers' paths too).
_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "raypipe").is_dir():
    sys.path.insert(0, str(_REPO))


def main(argv: list[str]) -> int:
    from raypipe.cli import main as cli_main

    return cli_main(["extract", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
