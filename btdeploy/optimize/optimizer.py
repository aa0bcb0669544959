"""`btdeploy optimize`: run the graph passes on an exported head and record what they fused."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from btdeploy.artifacts.graph_names import Flavour, graph_file, parse_flavour
from btdeploy.artifacts.locks import head_lock
from btdeploy.artifacts.manifest import Manifest, read_manifest
from btdeploy.artifacts.onnx_files import GraphBatch, load_graph
from btdeploy.backends.targets import graph_checks, graph_requirements
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.optimize.graph_checks import require_fp16_safe
from btdeploy.optimize.passes import LEAST_SOURCE_OPSET, optimize_graph
from btdeploy.progress import say, step


def expected_fusions(config: Any, head: HeadSpec, stem: str) -> tuple[int, int]:
    """(attention blocks, bridges) a graph holds: the whole head, or one split part of it."""
    layers = int(config.text_config.num_hidden_layers)
    if stem in ("text", "vision"):
        return layers, 0  # every text layer; the vision layers that run in step with them
    if stem == "fusion":
        return head.attention_blocks(config) - 2 * layers, head.bridges(config)
    return head.attention_blocks(config), head.bridges(config)


_PACKAGES = ("btdeploy", "onnx")  # the tools an optimized graph depends on


def optimize_head(
    folder: Path, flavour: Flavour | str, allow_partial: bool = False, reuse: bool = False
) -> dict[str, Any]:
    """Optimize model.onnx (and the split graphs, where the head has them) in one flavour.

    Fewer fused attention blocks or bridges than the head declares is an error that says why
    each block did not match, unless `allow_partial` accepts it. With `reuse`, graphs already on
    disk that were made from the same exported graphs by the same tool versions are kept."""
    chosen = parse_flavour(flavour)
    if chosen is None:
        raise BtDeployError("--flavour is required: choose one of " + ", ".join(f.value for f in Flavour))
    with head_lock(folder, f"btdeploy optimize --flavour {chosen}"):
        manifest = read_manifest(folder)
        _require_source_opset(manifest)
        made_by = {
            # The source is hashed in full: its recorded sha256 is what the new graph says it came from.
            stem: manifest.made_by(
                manifest.graph_path(None, stem=stem, full_hash=True), _PACKAGES, allow_partial=allow_partial
            )
            for stem in manifest.stems
        }
        recorded = manifest.data.get("optimized", {}).get(str(chosen))
        if reuse and manifest.up_to_date(recorded, made_by):
            say(f"optimize {manifest.head} ({chosen}): {recorded['file']} is up to date "
                "(same exported graph and tool versions); --force makes it again")  # fmt: skip
            return dict(recorded, reused=True)
        with GraphBatch() as batch:  # every graph of the head, or none: stage, then swap, then record
            summaries = {
                stem: {**_optimize_graph(manifest, chosen, stem, allow_partial, batch), **made_by[stem]}
                for stem in manifest.stems
            }
        summary = manifest.record_step(summaries)
        manifest.data.setdefault("optimized", {})[str(chosen)] = summary
        manifest.write()
    return summary


def _require_source_opset(manifest: Manifest) -> None:
    opset = manifest.data.get("onnx", {}).get("opset")
    if isinstance(opset, int) and opset < LEAST_SOURCE_OPSET:
        raise BtDeployError(
            f"optimize {manifest.head}: it was exported at opset {opset}, where LayerNorm is written out as "
            f"ReduceMean, Sub, Pow, Sqrt and Div; the graph passes fuse ONNX LayerNormalization (opset "
            f"{LEAST_SOURCE_OPSET}): export again with --opset {LEAST_SOURCE_OPSET} or later (the default), "
            "or ship model.onnx as it is"
        )


def _optimize_graph(
    manifest: Manifest, flavour: Flavour, stem: str, allow_partial: bool, batch: GraphBatch
) -> dict[str, Any]:
    source = manifest.graph_path(None, stem=stem)
    label = manifest.head if stem == "model" else f"{manifest.head} {stem}"
    with step(f"optimize {label} ({flavour})") as cost:
        model = load_graph(source, "export the head again")
        model, results = optimize_graph(model, flavour)
        summary = _check_optimized(manifest, flavour, stem, model, results, allow_partial)
        batch.stage(model, manifest.folder / summary["file"])
        del model
    return {**summary, **cost.to_json()}


def _check_optimized(
    manifest: Manifest, flavour: Flavour, stem: str, model: Any, results: dict[str, Any], allow_partial: bool
) -> dict[str, Any]:
    """Say what the passes did, refuse a graph short of its fusions or with operators its targets
    cannot parse, and return its summary."""
    head = get_head(manifest.head)
    label = manifest.head if stem == "model" else f"{manifest.head} {stem}"
    for result in results.values():
        extra = ", ".join(f"{k} {v}" for k, v in result.details.items())
        say(f"  {result.name:<24} {result.fused:>4} rewritten  nodes {result.nodes_before} -> {result.nodes_after}"
            + (f"  ({extra})" if extra else ""))  # fmt: skip
    attention = results["attention"].fused
    bridges = results["bridge add+LayerNorm"].fused
    expected_attention, expected_bridge = expected_fusions(manifest.config, head, stem)
    shortfall = attention < expected_attention or bridges < expected_bridge
    if shortfall and not allow_partial:
        reasons = "; ".join(results["attention"].unmatched[:3]) or "no unmatched attention block was reported"
        raise BtDeployError(
            f"optimize {label} ({flavour}): fused {attention} of {expected_attention} attention blocks and "
            f"{bridges} of {expected_bridge} bridges ({reasons}); export again with btdeploy export, or pass "
            "--allow-partial to keep the partly fused graph"
        )
    target = manifest.folder / graph_file(flavour, stem=stem)
    summary: dict[str, Any] = {
        "file": target.name,
        "attention_fused": attention,
        "attention_expected": expected_attention,
        "bridges_fused": bridges,
        "bridges_expected": expected_bridge,
        "partial": shortfall,
        "passes": [asdict(r) for r in results.values()],
        "nodes": len(model.graph.node),
    }
    summary["requires"] = graph_requirements(flavour)
    for target_name, check in graph_checks(flavour).items():
        problems = check(model)
        summary[f"{target_name}_op_check"] = {"passed": not problems, "unsupported": problems}
        if problems:
            raise BtDeployError(
                f"the {flavour} graph of {label} has operators {target_name} cannot parse: {', '.join(problems)}"
            )
    require_fp16_safe(model, f"the {flavour} graph of {label}")
    say(f"optimize {label} ({flavour}): attention blocks fused: {attention} of {expected_attention}, "
        f"bridge add+LayerNorm: {bridges} of {expected_bridge} -> {target}")  # fmt: skip
    return summary
