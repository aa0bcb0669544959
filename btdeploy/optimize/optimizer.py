"""`btdeploy optimize`: run the graph passes on an exported head and record what they fused."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from btdeploy.artifacts.files import sha256_of
from btdeploy.artifacts.manifest import Manifest, precision_file, read_manifest
from btdeploy.backends.tensorrt.operators import check_tensorrt_ops
from btdeploy.errors import BtDeployError
from btdeploy.export.exporter import EXTERNAL_DATA_NAME, PROTOBUF_LIMIT
from btdeploy.optimize.graph_checks import require_fp16_safe
from btdeploy.optimize.passes import FLAVOURS, expected_attention_blocks, expected_bridges, optimize_graph
from btdeploy.progress import say, step


def save_model_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write model (and its external data past 2 GB) under temporary names, then rename."""
    large = model.ByteSize() > PROTOBUF_LIMIT
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    data_name = path.name.replace(".onnx", "") + "." + EXTERNAL_DATA_NAME.split(".", 1)[1] if large else None
    try:
        if large:
            tmp_data = f".{data_name}.partial"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data)
            # The model names its data file; point it at the final name before renaming both.
            saved = onnx.load(tmp, load_external_data=False)
            for tensor in saved.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = str(data_name)
            onnx.save_model(saved, tmp)
            os.replace(path.parent / tmp_data, path.parent / str(data_name))
        else:
            onnx.save_model(model, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def expected_fusions(config: Any, head: str, stem: str) -> tuple[int, int]:
    """(attention blocks, bridges) a graph holds: the whole head, or one split part of it."""
    layers = int(config.text_config.num_hidden_layers)
    if stem in ("text", "vision"):
        return layers, 0  # every text layer; the vision layers that run in step with them
    if stem == "fusion":
        return expected_attention_blocks(config, head) - 2 * layers, expected_bridges(config)
    return expected_attention_blocks(config, head), expected_bridges(config)


def optimize_head(folder: Path, flavour: str) -> dict[str, Any]:
    """Optimize model.onnx (and the split graphs, where the head has them) in one flavour."""
    if flavour not in FLAVOURS:
        raise BtDeployError(f"--flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    manifest = read_manifest(folder)
    summary = _optimize_graph(manifest, flavour, "model")
    parts = {stem: _optimize_graph(manifest, flavour, stem) for stem in manifest.stems if stem != "model"}
    if parts:
        summary["parts"] = parts
    _record(manifest, flavour, summary)
    return summary


def _optimize_graph(manifest: Manifest, flavour: str, stem: str) -> dict[str, Any]:
    config = manifest.config
    source = manifest.graph_path(None, None, stem)
    label = manifest.head if stem == "model" else f"{manifest.head} {stem}"
    if not source.is_file():
        raise BtDeployError(f"{source} is missing: export the head again")
    with step(f"optimize {label} ({flavour}): loading {source.name}"):
        try:
            model = onnx.load(str(source))
        except Exception as error:
            raise BtDeployError(f"cannot read {source} ({error}): export the head again") from None
    with step(f"optimize {label} ({flavour}): running the passes"):
        model, results = optimize_graph(model, flavour)
    for result in results:
        extra = ", ".join(f"{k} {v}" for k, v in result.details.items())
        say(f"  {result.name:<24} {result.fused:>4} rewritten  nodes {result.nodes_before} -> {result.nodes_after}"
            + (f"  ({extra})" if extra else ""))  # fmt: skip
    attention = next(r for r in results if r.name == "attention").fused
    bridges = next(r for r in results if r.name.startswith("bridge")).fused
    expected_attention, expected_bridge = expected_fusions(config, manifest.head, stem)
    target = manifest.folder / precision_file(flavour, "fp32", stem)
    summary: dict[str, Any] = {
        "file": target.name,
        "attention_fused": attention,
        "attention_expected": expected_attention,
        "bridges_fused": bridges,
        "bridges_expected": expected_bridge,
        "passes": [asdict(r) for r in results],
        "nodes": len(model.graph.node),
    }
    if flavour == "trt":
        ops = check_tensorrt_ops(model)
        summary["tensorrt_op_check"] = {"passed": ops.passed, "unsupported": ops.unsupported, "opset": ops.opset}
        if not ops.passed:
            raise BtDeployError(
                f"the trt graph of {label} has operators TensorRT cannot parse: {', '.join(ops.unsupported)}"
            )
    require_fp16_safe(model, f"the {flavour} graph of {label}")
    save_model_atomically(model, target)
    summary["sha256"] = sha256_of(target)
    say(f"optimize {label} ({flavour}): attention blocks fused: {attention} of {expected_attention}, "
        f"bridge add+LayerNorm: {bridges} of {expected_bridge} -> {target}")  # fmt: skip
    return summary


def _record(manifest: Manifest, flavour: str, summary: dict[str, Any]) -> None:
    manifest.data.setdefault("optimized", {})[flavour] = summary
    manifest.write()
