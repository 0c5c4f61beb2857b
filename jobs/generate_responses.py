"""Ray job entrypoint for `raypipe generate`: generate responses only, on the running cluster."""

import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the repo: import the raypipe beside this file
# (under `ray job submit --working-dir .`, the job's copy; Ray puts it on workers' paths too).
_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "raypipe").is_dir():
    sys.path.insert(0, str(_REPO))


def main(argv: list[str]) -> int:
    from raypipe.cli import main as cli_main

    if not any(a == "--address" or a.startswith("--address=") for a in argv):
        argv = [*argv, "--address", "auto"]  # join the cluster the job was submitted to
    return cli_main(["generate", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
