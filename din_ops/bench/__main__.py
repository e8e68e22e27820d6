"""``python -m din_ops.bench``: the main job (see din_ops/bench/runner.py, or ``--help``)."""
import sys

from din_ops.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
