"""Run the benchmark harness: `python benchmarks/bench.py DIR [options]` is `btdeploy bench DIR [options]`."""

import sys

from btdeploy.cli import main
from btdeploy.hugepages import reexec_with_hugepages

if __name__ == "__main__":
    reexec_with_hugepages(["-m", "btdeploy.cli", "bench", *sys.argv[1:]])  # as `btdeploy bench` starts
    sys.exit(main(["bench", *sys.argv[1:]]))
