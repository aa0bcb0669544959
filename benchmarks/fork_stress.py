"""Fork a worker right after each run of a loaded head, many times, and count the workers that hang.

A preforking server or a multiprocessing pool may fork while the engine's worker threads are still
going to sleep after a run; a lock one of them held then stays held in the child. Each child runs
the model it inherited (or, with --own, one it loads itself) twice and ends normally; one that has
not ended after --child-limit seconds is counted as hung, its native stacks written by py-spy where
it is installed, and killed. Also counted: the forks at whose moment another thread of the process
was running, after btdeploy's wait for them to sleep (--settle-limit 0: no wait).

    python benchmarks/fork_stress.py EXPORT --backend onnxruntime --forks 1000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from btdeploy.cli import script_entry
from btdeploy.errors import BtDeployError
from btdeploy.progress import say


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="an export directory (btdeploy export)")
    parser.add_argument("--head", default="itm")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino", "torch"])
    parser.add_argument("--forks", type=int, default=500)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between a run's end and the fork")
    parser.add_argument("--own", action="store_true", help="each child loads its own model instead")
    parser.add_argument("--child-limit", type=float, default=20.0, help="seconds before a child counts as hung")
    parser.add_argument("--dumps", type=Path, help="a folder for the hung children's stacks (py-spy)")
    parser.add_argument(
        "--settle-limit", type=float, help="seconds a fork waits for the other threads to sleep (btdeploy's: 0.5)"
    )
    return parser.parse_args()


def live_child(args: argparse.Namespace, model: Any, feeds: dict[str, Any]) -> None:
    import btdeploy

    worker = btdeploy.load(args.export, head=args.head, backend=args.backend) if args.own else model
    for _ in range(2):
        worker(**feeds)
    del worker
    sys.exit(0)


def hung(child: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while os.waitpid(child, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)
    return False


def dump_stacks(child: int, dumps: Path | None, fork: int) -> None:
    if dumps is None or shutil.which("py-spy") is None:
        return
    dumps.mkdir(parents=True, exist_ok=True)
    stacks = subprocess.run(["py-spy", "dump", "--native", "--pid", str(child)], capture_output=True, text=True)
    (dumps / f"hung_{fork}.txt").write_text(stacks.stdout + stacks.stderr)


def main() -> int:
    args = parse_args()
    if not args.export.is_dir():
        raise BtDeployError(f"{args.export} is not a directory: give an export directory (btdeploy export)")
    running_at_fork: list[int] = []

    def look_at_threads() -> None:
        from btdeploy.forks import running_threads_besides_this_one

        running_at_fork.append(running_threads_besides_this_one() or 0)

    # Before-fork hooks run in reverse order of registration: registered before btdeploy.forks is
    # imported (by the load), this one runs after btdeploy's wait, nearest the fork.
    os.register_at_fork(before=look_at_threads)
    import btdeploy
    from btdeploy import forks
    from btdeploy.model.inputs import sample_inputs

    if args.settle_limit is not None:
        forks.SETTLE_LIMIT_S = args.settle_limit
    model = btdeploy.load(args.export, head=args.head, backend=args.backend)
    feeds = sample_inputs(model.config, 4, 24, seed=9)
    hangs: list[int] = []
    started = time.monotonic()
    for fork in range(1, args.forks + 1):
        model(**feeds)
        time.sleep(args.delay)
        child = os.fork()
        if child == 0:
            live_child(args, model, feeds)
        if hung(child, args.child_limit):
            hangs.append(fork)
            dump_stacks(child, args.dumps, fork)
            os.kill(child, 9)
            os.waitpid(child, 0)
            say(f"fork {fork}: the child had not ended after {args.child_limit:g} s (killed)")
        if fork % 100 == 0 or fork == args.forks:
            say(f"{fork} of {args.forks} forks, {len(hangs)} hung, {time.monotonic() - started:.0f} s")
    whose = "its own model" if args.own else "the inherited model"
    busy = sum(1 for running in running_at_fork if running)
    print(
        f"{args.backend} {args.head}, children running {whose}, forked {args.delay:g} s after a run "
        f"(wait for sleeping threads: at most {forks.SETTLE_LIMIT_S:g} s): {len(hangs)} of {args.forks} hung"
        + (f" (forks {', '.join(map(str, hangs))})" if hangs else "")
        + f"; another thread running at the fork in {busy} of {len(running_at_fork)}"
    )
    return 1 if hangs else 0


if __name__ == "__main__":
    script_entry(main)
