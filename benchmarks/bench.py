"""Run the benchmark harness: `python benchmarks/bench.py DIR [options]` is `btdeploy bench DIR [options]`."""

import sys

from btdeploy.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
