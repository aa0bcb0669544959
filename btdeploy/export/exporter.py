"""PyTorch -> ONNX, one graph per head, dynamic batch and text length, with a manifest."""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import file_hashes, folder_sha256, staged_directory
from btdeploy.artifacts.graph_names import graph_file
from btdeploy.artifacts.locks import head_lock
from btdeploy.artifacts.manifest import (
    MANIFEST_NAME,
    MODEL_NAME,
    PROCESSOR_DIR,
    PROCESSOR_READ_BY_TRANSFORMERS,
    Manifest,
    read_manifest,
    tool_versions,
)
from btdeploy.artifacts.onnx_files import (
    data_file,
    graph_bytes,
    graph_sha256,
    load_graph,
    save_graph_atomically,
)
from btdeploy.errors import BtDeployError
from btdeploy.export.held_weights import ExportedGraph, weights_held_back
from btdeploy.export.patches import fusable_export
from btdeploy.export.torch_export import LEAST_CONVERTIBLE_OPSET, export_with_torch_export
from btdeploy.export.trace_request import TraceRequest
from btdeploy.imports import serial_imports
from btdeploy.model.checkpoints import LoadedModel, ModelSource, load_head_model, weights_sha256
from btdeploy.model.configs import config_fingerprint, max_text_length
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.model.inputs import sample_inputs
from btdeploy.model.media import image_size_problem
from btdeploy.model.preprocessor import disagreement, unread_setting
from btdeploy.model.tokenizer import vocabulary_problem
from btdeploy.model.towers import head_module, part_modules, part_specs
from btdeploy.progress import say, step, warn

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(14, 21)  # what the TorchScript exporter emits
# torch's exporters, each with the name its manifests record: TorchScript (the default, deprecated
# by torch) and torch.export ("dynamo", export/torch_export.py). Both graphs go through the same
# passes, quantizers and checks.
_EXPORTER_NAMES = {
    "torchscript": "torch.onnx (TorchScript), btdeploy.patches.fusable_export",
    "dynamo": "torch.onnx (torch.export, dynamo=True), btdeploy.patches.fusable_export",
}
EXPORTERS = tuple(_EXPORTER_NAMES)
DEFAULT_EXPORTER = "torchscript"


def exported_with(manifest: Manifest) -> str | None:
    """Which of EXPORTERS wrote this head's graphs (None: an export from before manifests said)."""
    recorded = manifest.data.get("onnx", {}).get("exporter")
    return next((key for key, name in _EXPORTER_NAMES.items() if name == recorded), None)


def export_head(
    source: ModelSource,
    head_name: str,
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    split: bool = False,
    reuse: bool = False,
    exporter: str = DEFAULT_EXPORTER,
) -> Manifest:
    """Export one head to out_dir/<head>/model.onnx with its manifest; all-or-nothing.

    With `split`, the text tower, vision tower and fusion graphs (text.onnx, vision.onnx,
    fusion.onnx) are written beside it. With `reuse`, an export already there from the same
    checkpoint (same files), seed, opset, exporter and tool versions, with its graphs intact, is
    kept (one with split graphs also where `split` is not asked for). `exporter` is one of
    EXPORTERS: torch's TorchScript exporter or its torch.export-based one."""
    if exporter not in EXPORTERS:
        raise BtDeployError(f"--exporter {exporter} is not known: use one of {', '.join(EXPORTERS)}")
    if opset not in SUPPORTED_OPSETS:
        raise BtDeployError(
            f"--opset {opset} is not supported: use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    if exporter == "dynamo" and opset < LEAST_CONVERTIBLE_OPSET:
        # said before the model loads and exports for minutes, only for ONNX's converter to fail
        raise BtDeployError(
            f"--opset {opset} with --exporter dynamo: its graphs convert down to opset {LEAST_CONVERTIBLE_OPSET} "
            f"at the oldest (LayerNormalization came with it): export at --opset {LEAST_CONVERTIBLE_OPSET} or "
            "later, or with --exporter torchscript"
        )
    head = get_head(head_name)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise BtDeployError(f"--out {out_dir} is a file: give a folder (each head goes to OUT/<head>/)")
    final = Path(out_dir) / head.name
    hashes = file_hashes(source.checkpoint)
    checkpoint_sha256, weights = folder_sha256(source.checkpoint, hashes), weights_sha256(source.checkpoint, hashes)
    if reuse:
        kept = _reusable_export(final, source, checkpoint_sha256, opset, split, exporter)
        if kept is not None:
            say(f"export {head.name}: {final / MODEL_NAME} is up to date (same checkpoint, seed, opset, exporter "
                "and tool versions); --force exports it again")  # fmt: skip
            return kept
    with step(f"export {head.name}") as cost:
        manifest = _export(source, head, final, opset, split, checkpoint_sha256, weights, exporter)
    manifest.data["onnx"]["step"] = cost.to_json()  # the whole step, reference load included
    manifest.write()
    say(f"wrote {final / MODEL_NAME} ({graph_bytes(final / MODEL_NAME) / 1e6:.1f} MB)")
    return manifest


def _reusable_export(
    final: Path, source: ModelSource, checkpoint_sha256: str, opset: int, split: bool, exporter: str
) -> Manifest | None:
    """The export already in `final`, when this run would write the same graphs; else None."""
    try:
        manifest = read_manifest(final)
    except BtDeployError:
        return None
    model, onnx_record = manifest.data["model"], manifest.data.get("onnx", {})
    same = (
        model.get("source") == source.spec
        and model.get("seed") == source.seed
        and model.get("checkpoint_sha256") == checkpoint_sha256
        and onnx_record.get("opset") == opset
        and onnx_record.get("exporter") == _EXPORTER_NAMES[exporter]
        # An export with split graphs serves a run that does not ask for them (its whole graph is
        # the same): re-exporting would throw away the split graphs and every graph made from them.
        and (bool(manifest.data.get("split")) or not split)
        and manifest.data.get("versions") == tool_versions()
    )
    if not same:
        return None
    graphs = [final / graph_file(None, stem=stem) for stem in manifest.stems]
    if not all(manifest.graph_intact(path) for path in graphs):
        return None
    manifest.reused = True
    return manifest


def _export(
    source: ModelSource,
    head: HeadSpec,
    final: Path,
    opset: int,
    split: bool,
    checkpoint_sha256: str,
    weights: str,
    exporter: str,
) -> Manifest:
    with step(f"loading the {head.name} reference from {source.spec}"):
        loaded = load_head_model(source, head)
    with head_lock(final, f"btdeploy export --heads {head.name}"), staged_directory(final) as staging:
        with step(f"exporting {head.name} to ONNX (opset {opset}, {exporter} exporter)"):
            exported, seconds = _torch_to_onnx(loaded, head, staging / MODEL_NAME, opset, exporter)
        with step(f"checking {head.name} with the ONNX checker and writing it"):
            external = _store_model(exported, staging / MODEL_NAME)
            del exported
        parts = _export_parts(loaded, head, staging, opset, exporter) if split else None
        processor_problem, read_by_transformers = _copy_processor(source, staging / PROCESSOR_DIR, loaded.config)
        manifest = Manifest(
            final, _manifest_data(source, head, loaded, opset, exporter, staging, external, seconds, processor_problem)
        )
        if read_by_transformers:
            manifest.data[PROCESSOR_READ_BY_TRANSFORMERS] = read_by_transformers
        if parts:
            manifest.data["split"] = parts
        manifest.data["model"]["checkpoint_sha256"] = checkpoint_sha256
        manifest.data["model"]["weights_sha256"] = weights  # what check's reference must be rebuilt from
        manifest.folder = staging
        for stem in manifest.stems:
            manifest.record_graph(staging / graph_file(None, stem=stem))
        manifest.write()
    manifest.folder = final
    return manifest


def trace_text_length(head: HeadSpec, config: Any) -> int:
    """The text length the export traces with (the axis stays dynamic), within the model's positions:
    a config with max_position_embeddings 12 takes 10 tokens, and the trace at 16 had failed."""
    return min(head.export_text_length, max_text_length(config))


def _torch_to_onnx(
    loaded: LoadedModel, head: HeadSpec, path: Path, opset: int, exporter: str
) -> tuple[ExportedGraph, float]:
    feeds = sample_inputs(loaded.config, head.export_batch, trace_text_length(head, loaded.config), seed=1234)
    args = tuple(feeds[name] for name in head.input_names)
    module = head_module(loaded.model, head)
    axes = head.dynamic_axes(loaded.config)
    request = TraceRequest(module, args, opset, head.input_names, head.output_names, axes, f"the {head.name} head")
    return _trace(request, path, exporter)


def _trace(request: TraceRequest, path: Path, exporter: str) -> tuple[ExportedGraph, float]:
    """The request's module on its inputs (numpy arrays or tensors) to ONNX with `exporter`, under the
    export patches: the graph, each weight a stub with its bytes apart, and the seconds it took.
    Export at batch 2 and a mid text length with padding, so no axis is specialised to 1 and the mask
    path is traced with zeros in it."""
    import torch

    tensors = tuple(torch.from_numpy(a) if not isinstance(a, torch.Tensor) else a for a in request.tensors)
    request = replace(request, tensors=tensors)
    started = time.monotonic()
    with torch.no_grad(), fusable_export():
        exported = export_with_torch_export(request) if exporter == "dynamo" else _torchscript_export(request, path)
    request.module.eval()  # the exporters restore the training flag they found; keep eval for any later use
    return exported, time.monotonic() - started


def _torchscript_export(request: TraceRequest, path: Path) -> ExportedGraph:
    """The TorchScript exporter with the weights held back (export/held_weights.py): torch writes the
    graph alone to `path`, which is read back and takes its weights as stubs."""
    import torch

    with warnings.catch_warnings(), weights_held_back() as held:
        warnings.simplefilter("ignore")  # tracer warnings about Python branches, all on static config
        try:
            torch.onnx.export(
                request.module,
                request.tensors,
                str(path),
                dynamo=False,
                opset_version=request.opset,
                input_names=request.input_names,
                output_names=request.output_names,
                dynamic_axes=request.dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as error:
            raise BtDeployError(f"torch.onnx.export failed for {request.what}: {error}") from None
    return held.graph(load_graph(path, "export again"))


def _export_parts(loaded: LoadedModel, head: HeadSpec, staging: Path, opset: int, exporter: str) -> dict[str, Any]:
    """text.onnx, vision.onnx and fusion.onnx; the fusion graph is traced on the towers' outputs."""
    import torch

    config = loaded.config
    specs, modules = part_specs(head), part_modules(loaded.model, head)
    feeds = sample_inputs(config, head.export_batch, trace_text_length(head, config), seed=1234)
    with torch.no_grad(), fusable_export():
        text_states = modules["text"](*(torch.from_numpy(feeds[n]) for n in specs["text"].input_names))[0]
        image_states = modules["vision"](torch.from_numpy(feeds["pixel_values"]))[0]
    args = {
        "text": (feeds["input_ids"], feeds["attention_mask"]),
        "vision": (feeds["pixel_values"],),
        "fusion": (text_states, image_states, feeds["attention_mask"]),
    }
    parts: dict[str, Any] = {}
    for name, spec in specs.items():
        target = staging / f"{name}.onnx"
        with step(f"exporting the {head.name} {name} graph"):
            request = TraceRequest(modules[name], args[name], opset, spec.input_names, spec.output_names,
                                   spec.dynamic_axes(config), f"the {head.name} {name} graph")  # fmt: skip
            exported, _ = _trace(request, target, exporter)
            _store_model(exported, target)
            del exported
        parts[name] = {
            "file": target.name,
            "sha256": graph_sha256(target),
            "inputs": spec.input_names,
            "outputs": spec.output_names,
        }
    return parts


def _store_model(exported: ExportedGraph, target: Path) -> bool:
    """Check the exported graph and write it as `target`: one file, or the graph + `<target>.data`
    past 2 GB. Returns whether external data is used.

    The checker runs on a weightless copy: it reads a weight's type and dims, never its bytes, but
    parsing them took it 14-22 s on base against about 1 s for the load and the copy."""
    import onnx

    from btdeploy.artifacts.weightless import check_without_weights

    try:
        check_without_weights(exported.model, exported.weights)
    except onnx.checker.ValidationError as error:
        raise BtDeployError(f"the exported graph fails the ONNX checker: {' '.join(str(error).split())}") from None
    return save_graph_atomically(exported.model, target, apart=exported.weights)


def _copy_processor(source: ModelSource, target: Path, config: Any) -> tuple[str | None, str | None]:
    """Keep the checkpoint's processor beside the model, so `run` and the seed examples need nothing
    else; or say why it cannot be kept (the first of the two returned, recorded in the manifest).
    The second: why btdeploy's own reading of the copy (model/preprocessor) is not transformers'
    on a probe, where it is not, so that commands read that copy with transformers instead."""
    with serial_imports():
        from transformers import BridgeTowerProcessor

    try:
        processor = BridgeTowerProcessor.from_pretrained(source.checkpoint)
        problem = vocabulary_problem(processor.tokenizer, int(config.text_config.vocab_size))
        problem = problem or image_size_problem(processor.image_processor, int(config.vision_config.image_size))
    except Exception as error:
        problem = f"no usable processor ({' '.join(str(error).split())})"
    if problem:
        warn(f"{source.checkpoint}: {problem}; btdeploy run will not work on this export")
        return problem, None
    if processor.tokenizer.padding_side != "right":
        # Every head's answer but mlm's reads each text's first token ([CLS]); padded on the left,
        # a shorter text of a batch puts a pad there, in transformers too.
        say(f"{source.checkpoint}: its tokenizer pads on the {processor.tokenizer.padding_side}; BridgeTower reads "
            "each text's first token, so the export's processor pads on the right")  # fmt: skip
        processor.tokenizer.padding_side = "right"
    processor.save_pretrained(target)
    unread = unread_setting(target)
    differs = None if unread else disagreement(target, BridgeTowerProcessor.from_pretrained(target))
    if unread or differs:
        say(f"{source.checkpoint}: its processor is read with transformers at run time, which imports torch "
            f"(btdeploy's own reading does not read it: {unread or differs})")  # fmt: skip
    return None, unread or differs


def _manifest_data(
    source: ModelSource,
    head: HeadSpec,
    loaded: LoadedModel,
    opset: int,
    exporter: str,
    folder: Path,
    external: bool,
    seconds: float,
    processor_problem: str | None,
) -> dict[str, Any]:
    config = loaded.config
    return {
        "format": 1,
        "head": head.name,
        "description": head.description,
        "model": {
            "source": source.spec,
            "is_preset": source.is_preset,
            "seed": source.seed,
            "class": head.model_class,
            "config_sha256": config_fingerprint(config),
            "config": config.to_dict(),
            "missing_weights": loaded.missing_weights,
        },
        "onnx": {
            "file": MODEL_NAME,
            "external_data": data_file(folder / MODEL_NAME).name if external else None,
            "sha256": graph_sha256(folder / MODEL_NAME),
            "opset": opset,
            "exporter": _EXPORTER_NAMES[exporter],
            "export_shape": {"batch": head.export_batch, "text_length": head.export_text_length},
            "export_seconds": round(seconds, 2),
        },
        "limits": {"max_text_length": max_text_length(config), "image_size": config.vision_config.image_size},
        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": s.shape(config)} for s in head.inputs],
        "outputs": [{"name": s.name, "dtype": "float32", "shape": s.dims(config)} for s in head.outputs],
        "processor": None if processor_problem else PROCESSOR_DIR,
        **({"processor_problem": processor_problem} if processor_problem else {}),
        "versions": tool_versions(),
    }


def export_heads(
    source: ModelSource,
    heads: list[str],
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    split: bool = False,
    exporter: str = DEFAULT_EXPORTER,
) -> list[Manifest]:
    manifests = []
    for index, head in enumerate(heads, 1):
        say(f"head {index}/{len(heads)}: {head}")
        manifests.append(export_head(source, head, out_dir, opset, split, exporter=exporter))
    return manifests


__all__ = [
    "export_head",
    "export_heads",
    "exported_with",
    "DEFAULT_EXPORTER",
    "DEFAULT_OPSET",
    "EXPORTERS",
    "MANIFEST_NAME",
]
