"""`btdeploy check`: rebuild each head's reference from its manifest and hold the runtime to its tolerances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_json
from btdeploy.artifacts.graph_names import graph_file
from btdeploy.artifacts.manifest import head_folders, read_manifest
from btdeploy.backends.targets import RunOptions, get_target
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.progress import step
from btdeploy.verify.parity import ParityRow, check_head, parse_shapes


def check_export(
    root: Path,
    heads: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 3),
    text_lengths: tuple[int, ...] = (5, 40),
    backend: str = "onnxruntime",
    providers: list[str] | None = None,
    report: Path | None = None,
    flavour: str | None = None,
    precision: str = "fp32",
    split: bool = False,
) -> list[ParityRow]:
    """Reference vs the chosen graph; a reduced `precision` reads model.<flavour>.<precision>.onnx
    (flavour ort unless given) and is held to that precision's tolerances."""
    if report is not None and Path(report).is_dir():
        raise BtDeployError(f"--report {report} is a folder: give a file name such as {Path(report) / 'parity.json'}")
    target = get_target(backend)
    requested = {"providers": providers, "flavour": flavour, "split": split, "precision": precision}
    # check holds every graph to its full recorded hash, where the target reads graphs itself
    options = target.resolve(requested | ({"verify_hash": True} if "verify_hash" in target.options else {}))
    reference_target = get_target("torch")
    reference_options = reference_target.resolve({})
    rows: list[ParityRow] = []
    for folder in head_folders(Path(root), heads):
        manifest = read_manifest(folder)
        head = get_head(manifest.head)
        config = manifest.config
        shapes = parse_shapes(list(batch_sizes), list(text_lengths), config)
        # The candidate first: a backend that cannot run here fails before the reference is built.
        candidate = target.make(manifest, options)
        with step(f"check {head.name}: rebuilding the PyTorch reference"):
            reference = reference_target.make(manifest, reference_options)
        shape_text = ", ".join(f"{b}x{n}" for b, n in shapes)
        with step(f"check {head.name}: {candidate.description} vs reference at batch x length {shape_text}"):
            rows += check_head(head, config, reference, candidate, shapes, options.precision)
        del reference
    if report is not None:
        write_json(Path(report), report_data(rows, backend, options))
    return rows


def report_data(rows: list[ParityRow], backend: str, options: RunOptions) -> dict[str, Any]:
    target = get_target(backend)
    return {
        "backend": backend,
        "graph": graph_file(options.flavour, options.precision) if target.reads_onnx else None,
        "flavour": options.flavour,
        "precision": options.precision,
        "split": options.split,
        "passed": all(r.passed for r in rows),
        "rows": [r.to_json() for r in rows],
    }
