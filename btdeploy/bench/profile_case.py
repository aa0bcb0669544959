"""The command line the profile scripts share (benchmarks/profile_ort.py, profile_openvino.py): one
graph of an exported head, one shape, and the inputs for it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.model.inputs import sample_inputs


@dataclass(frozen=True)
class ProfileCase:
    model: Path
    batch: int
    seq_len: int
    runs: int
    threads: int
    feeds: dict[str, Any]


def parse_profile_case(description: str | None, argv: list[str] | None = None) -> ProfileCase:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model*.onnx inside an exported head folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    config = read_manifest(args.model.parent).config
    feeds = sample_inputs(config, args.batch, args.seq_len, pad=False)
    return ProfileCase(args.model, args.batch, args.seq_len, args.runs, args.threads, feeds)
