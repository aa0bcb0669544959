"""One or more btdeploy commands run by two checkouts of btdeploy in turns, each run in a fresh
process: the wall time and peak resident memory of each, and whether both printed the same.
How a change to a command (`rank`, `index`, `run`) is measured against the code before it.

    python benchmarks/command_ab.py --before /tmp/before [--after .] [--rounds 3]
        --command "rank DIR --images photos/ --text 'a cat' --json" [--command "index DIR ... --out G"]
        [--clean G]

--before / --after: source trees holding the `btdeploy` package (a `git worktree add /tmp/before
<commit>` for the old code; --after defaults to this checkout), put first on PYTHONPATH of each
child, which is started from a scratch directory so that neither picks up the other from its
working directory (an argument naming a file or folder here is made absolute first). Each round
runs every command once per side, the sides in the other order every other round. Progress on
stderr; on stdout a Markdown table of medians and ratios, and the lines the two sides printed
differently, where they did.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from btdeploy.bench.machine import cpu_text, machine_description
from btdeploy.cli import script_entry
from btdeploy.errors import BtDeployError

SIDES = ("before", "after")


@dataclass
class Runs:
    """One command on one side: each run's seconds, peak resident MB and what it printed."""

    seconds: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    printed: list[str] = field(default_factory=list)


def run_once(source: Path, command: list[str], scratch: Path) -> tuple[float, float, str]:
    """The command as `python -m btdeploy.cli ...` with `source` first on its path: its wall
    seconds, its own peak resident MB (its rusage, not the parent's) and its standard output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))}
    # Both streams to files, not pipes: a pipe nobody reads while the child runs fills (64 KB of
    # progress lines) and stops the child.
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as errors:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "btdeploy.cli", *command], cwd=scratch, env=env, stdout=out, stderr=errors
        )
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            errors.seek(0)
            said = errors.read()[-800:]
            raise BtDeployError(f"{shlex.join(command)} with {source} exited {child.returncode}: {said}")
        out.seek(0)
        return seconds, usage.ru_maxrss / 1024, out.read()


def checkout(path: Path, option: str) -> Path:
    if not (path / "btdeploy" / "__init__.py").is_file():
        raise BtDeployError(f"{option} {path} holds no btdeploy package: give a checkout of this repository")
    return path.resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old code")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1], help="default: this one")
    parser.add_argument("--command", action="append", required=True, help="btdeploy's arguments, as in a shell")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each command per side (default: 3)")
    parser.add_argument(
        "--clean", type=Path, action="append", default=[],
        help="a file removed before every run: an output the command would otherwise reuse (index's --out)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.rounds < 1:
        raise BtDeployError("--rounds takes 1 or more")
    sources = {"before": checkout(args.before, "--before"), "after": checkout(args.after, "--after")}
    # Children start elsewhere (see above): paths given relative to here are made absolute.
    commands = [[str(Path(a).resolve()) if Path(a).exists() else a for a in shlex.split(t)] for t in args.command]
    runs = {(text, side): Runs() for text in args.command for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="command_ab_") as scratch:
        for round_index in range(args.rounds):
            order = SIDES if round_index % 2 == 0 else SIDES[::-1]
            for text, command in zip(args.command, commands, strict=True):
                for side in order:
                    for stale in args.clean:
                        stale.unlink(missing_ok=True)
                    seconds, peak_mb, printed = run_once(sources[side], command, Path(scratch))
                    kept = runs[text, side]
                    kept.seconds.append(seconds)
                    kept.peak_mb.append(peak_mb)
                    kept.printed.append(printed)
                    print(f"round {round_index + 1}/{args.rounds} {side}: {seconds:.2f} s, {peak_mb:.0f} MB: {text}",
                          file=sys.stderr)  # fmt: skip
    print(f"{cpu_text(machine_description(0))}; before: {sources['before']}, after: {sources['after']}")
    print()
    print(f"Medians of {args.rounds} fresh processes per side, the sides in turns:")
    print()
    print("| command | before s | after s | before / after | before peak MB | after peak MB | same output |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for text in args.command:
        before, after = runs[text, "before"], runs[text, "after"]
        wall = [statistics.median(side.seconds) for side in (before, after)]
        peak = [statistics.median(side.peak_mb) for side in (before, after)]
        same = "yes" if set(before.printed) | set(after.printed) == {before.printed[0]} else "no"
        print(f"| `{text}` | {wall[0]:.2f} | {wall[1]:.2f} | {wall[0] / wall[1]:.2f}x | {peak[0]:.0f} | "
              f"{peak[1]:.0f} | {same} |")  # fmt: skip
    for text in args.command:
        for side in SIDES:
            if len(set(runs[text, side].printed)) > 1:
                print(f"\n`{text}`: the {side} side printed differently from run to run")
        lines = [runs[text, side].printed[0].splitlines() for side in SIDES]
        differing = [[line for line in lines[i] if line not in lines[1 - i]] for i in (0, 1)]
        if any(differing):
            print(f"\n`{text}`, lines printed by one side only (first run of each):\n")
            for side, only in zip(SIDES, differing, strict=True):
                print("\n".join(f"    {side}: {line[:200]}" for line in only[:10]))


if __name__ == "__main__":
    script_entry(main)
