"""`btdeploy check`: rebuild each head's reference from its manifest and hold the runtime to its tolerances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_json
from btdeploy.artifacts.manifest import head_folders, precision_file, read_manifest
from btdeploy.backends.torch_reference import TorchBackend
from btdeploy.model.heads import get_head
from btdeploy.progress import step
from btdeploy.runtime.runtime import build_backend
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
    if precision != "fp32" and not flavour:
        flavour = "ort"
    rows: list[ParityRow] = []
    for folder in head_folders(Path(root), heads):
        manifest = read_manifest(folder)
        head = get_head(manifest.head)
        config = manifest.config
        shapes = parse_shapes(list(batch_sizes), list(text_lengths), config)
        # The candidate first: a backend that cannot run here fails before the reference is built.
        candidate = build_backend(manifest, backend, split, providers=providers, flavour=flavour, precision=precision)
        with step(f"check {head.name}: rebuilding the PyTorch reference"):
            reference = TorchBackend.from_manifest(manifest)
        shape_text = ", ".join(f"{b}x{n}" for b, n in shapes)
        with step(f"check {head.name}: {candidate.description} vs reference at batch x length {shape_text}"):
            rows += check_head(head, config, reference, candidate, shapes, precision)
        del reference
    if report is not None:
        write_json(Path(report), report_data(rows, backend, flavour, precision))
    return rows


def report_data(
    rows: list[ParityRow], backend: str, flavour: str | None = None, precision: str = "fp32"
) -> dict[str, Any]:
    return {
        "backend": backend,
        "graph": precision_file(flavour, precision) if flavour else "model.onnx",
        "precision": precision,
        "passed": all(r.passed for r in rows),
        "rows": [r.to_json() for r in rows],
    }
