"""`btdeploy quantize`: precision decided in the graph, before any engine is built.

One method per precision (btdeploy/quantize/methods.py); this module runs it on a head's
graphs, checks the result, and records how it was made in the manifest.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx

from btdeploy.artifacts.graph_names import Flavour, Precision, graph_file, parse_flavour
from btdeploy.artifacts.locks import head_lock
from btdeploy.artifacts.manifest import Manifest, read_manifest
from btdeploy.artifacts.onnx_files import GraphBatch, data_file, load_graph
from btdeploy.backends.targets import graph_checks
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph_checks import layernorm_types, qdq_summary, require_fp16_safe
from btdeploy.progress import say, step
from btdeploy.quantize.calibration import DEFAULT_CALIB_SIZE, CalibrationData, plan_calibration, warn_generated
from btdeploy.quantize.int8 import ACTIVATION_CODE
from btdeploy.quantize.methods import QuantizeMethod, get_method
from btdeploy.quantize.rows import ArrayRows, CalibrationRows, Feeds, SpooledRows


def _describe(model: onnx.ModelProto, precision: Precision, flavour: Flavour) -> dict[str, Any]:
    ops = Counter(node.op_type for node in model.graph.node)
    facts: dict[str, Any] = {"nodes": len(model.graph.node), "casts": ops.get("Cast", 0)}
    norms = layernorm_types(model)
    facts["layernorms_fp32"] = sum(1 for t in norms.values() if t == onnx.TensorProto.FLOAT)
    facts["layernorms"] = len(norms)
    if precision == "int8":
        code = ACTIVATION_CODE[flavour]
        qdq = qdq_summary(model, code.data_type, code.zero_point)
        facts.update(
            qdq_pairs=qdq.pairs,
            weights_int8=qdq.dequantize_only,
            matmuls_int8=qdq.quantized_matmuls,
            # Model Optimizer leaves matrix-vector products (one [CLS] row) in high precision,
            # where TensorRT runs them faster than as INT8 GEMMs.
            matmuls_excluded=qdq.unquantized_matmuls,
            activations=code.describe(),
            asymmetric=len(qdq.asymmetric),
            wrong_type=len(qdq.wrong_type),
            layernorm_or_softmax_quantized=qdq.quantized_no_qdq_ops,
        )
        if qdq.asymmetric or qdq.wrong_type or qdq.quantized_no_qdq_ops:
            raise BtDeployError(
                f"the INT8 {flavour} graph breaks its Q/DQ rules: {len(qdq.asymmetric)} asymmetric Q/DQ, "
                f"{len(qdq.wrong_type)} not {code.describe()} (weights: int8, zero point 0), "
                f"quantized LayerNorm/Softmax inputs: {qdq.quantized_no_qdq_ops[:3]}"
            )
    if precision == "int8-dynamic":
        facts["matmul_integer"] = ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)
    return facts


_FUSION_THROUGH = "text and vision towers (FP32 {flavour} graphs)"
_PACKAGES = ("btdeploy", "nvidia-modelopt", "onnxruntime-gpu", "onnx")  # the tools a quantized graph depends on


TOWER_ROWS = 8  # calibration rows run through the FP32 towers at once, for the fusion graph's inputs


def _fusion_rows(manifest: Manifest, calibration: CalibrationData, flavour: Flavour) -> SpooledRows:
    """The fusion graph's inputs: the calibration rows through the FP32 text and vision towers of
    the flavour being quantized from (the split backend of the target registry), TOWER_ROWS rows
    at a time and spooled to files, so that neither the towers' working memory nor the states
    held grow with --calib-size, and the towers are gone before the fusion graph is calibrated."""
    from btdeploy.backends.targets import build_split

    @functools.cache
    def towers() -> Any:  # opened when the rows are first read: a graph made from its twin reads none
        return build_split(manifest, flavour=flavour)

    inputs = manifest.input_names("fusion")

    def states(rows: Feeds) -> Feeds:  # the towers' outputs the fusion graph reads (not a head's own)
        made = {**towers().text(rows), **towers().vision(rows)}
        return {name: made[name] for name in inputs}

    return SpooledRows(ArrayRows(calibration.feeds), states, TOWER_ROWS, manifest.folder)


@contextmanager
def _stem_rows(
    manifest: Manifest, calibration: CalibrationData | None, stem: str, flavour: Flavour
) -> Iterator[CalibrationRows]:
    """The calibration rows of one graph: its own inputs, or for the fusion graph the towers' states."""
    if calibration is None:
        yield ArrayRows({})
    elif stem == "fusion":
        spooled = _fusion_rows(manifest, calibration, flavour)
        try:
            yield spooled
        finally:
            spooled.close()
    else:
        yield ArrayRows({name: calibration.feeds[name] for name in manifest.input_names(stem)})


def _calibration_source(source: dict[str, Any] | None, stem: str, flavour: Flavour) -> dict[str, Any] | None:
    if source is None:
        return None
    if stem == "fusion":
        return {**source, "through": _FUSION_THROUGH.format(flavour=flavour)}
    return source


def quantize_head(
    folder: Path,
    precision: Precision | str,
    flavour: Flavour | str = Flavour.ORT,
    calib_images: Path | None = None,
    calib_texts: Path | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
    reuse: bool = False,
    announce_generated: bool = True,
) -> dict[str, Any]:
    """Quantize model.onnx's optimized graph (and the split graphs, where the head has them).
    With `reuse`, graphs already on disk that this run would make the same way are kept.
    Calibrating on generated inputs is warned of loudly, unless the caller says it once itself
    (`announce_generated=False`: the pipeline)."""
    chosen = parse_flavour(flavour) or Flavour.ORT
    method = get_method(precision, chosen)
    key = f"{chosen}.{method.precision}"
    with head_lock(folder, f"btdeploy quantize --flavour {chosen} --precision {method.precision}"):
        manifest = read_manifest(folder)
        source_flavour, why = method.source(chosen)
        try:
            # Hashed in full: the quantized graph records its source's sha256 as where it came from.
            sources = {stem: manifest.graph_path(source_flavour, stem=stem, full_hash=True) for stem in manifest.stems}
        except BtDeployError as error:
            if source_flavour == chosen:
                raise
            # Asked for one flavour, told to optimize another: say why that graph is the source.
            raise BtDeployError(
                f"{method.precision} of the {chosen} flavour starts from the {source_flavour} graph ({why}): {error}"
            ) from None
        for source in sources.values():
            require_fp16_safe(load_graph(source, "optimize the head again", load_weights=False), f"{source}")
        # Only the rows the method reads are made: AutoCast's range check reads 4, and 100,000
        # generated rows for it had held 5 GB on tiny (about 100 GB on base) for nothing.
        plan = None
        if method.calibrates:
            plan = plan_calibration(manifest, calib_images, calib_texts, method.rows_to_load(calib_size))
        wanted = plan.source if plan else None
        made_by = {
            stem: manifest.made_by(
                sources[stem], _PACKAGES, calibration=_calibration_source(wanted, stem, source_flavour)
            )
            for stem in manifest.stems
        }
        recorded = manifest.precision_record(chosen, method.precision)
        if reuse and recorded is not None and manifest.up_to_date(recorded, made_by):
            say(f"quantize {manifest.head} ({chosen}, {method.precision}): {recorded['file']} is up to date "
                "(same source graph, calibration and tool versions); --force makes it again")  # fmt: skip
            return dict(recorded, reused=True)
        calibration = None
        if plan is not None and plan.source["kind"] == "generated" and announce_generated:
            warn_generated(f"the {key} graph of {manifest.head}", plan.size)
        if plan is not None:
            with step(f"quantize {manifest.head}: {plan.size} calibration rows ({plan.source['kind']})"):
                calibration = plan.load()
        summaries: dict[str, dict[str, Any]] = {}
        with GraphBatch() as batch:  # every graph of the head, or none: stage, then swap, then record
            for stem in manifest.stems:
                with _stem_rows(manifest, calibration, stem, source_flavour) as rows:
                    summaries[stem] = _quantize_graph(
                        manifest, method, chosen, stem, (sources[stem], why), rows, made_by, batch
                    )
        summary = manifest.record_step(summaries)
        for written in (summary, *summary.get("parts", {}).values()):
            _say_written(manifest.head, written)
        manifest.data.setdefault("precisions", {})[key] = summary
        manifest.write()
    return summary


def _quantize_graph(
    manifest: Manifest,
    method: QuantizeMethod,
    flavour: Flavour,
    stem: str,
    source_and_reason: tuple[Path, str],
    rows: CalibrationRows,
    made_by: dict[str, dict[str, Any]],
    batch: GraphBatch,
) -> dict[str, Any]:
    source, why = source_and_reason
    precision = method.precision
    label = manifest.head if stem == "model" else f"{manifest.head} {stem}"
    target = manifest.folder / graph_file(flavour, precision, stem)
    workdir = Path(tempfile.mkdtemp(prefix=".quantize.", suffix=".partial", dir=manifest.folder))
    try:
        with step(f"quantize {label} ({flavour}, {precision}) from {source.name}") as cost:
            twin = _twin(manifest, method, flavour, stem, made_by)
            if twin is not None:
                # The same method on the same source graph and calibration wrote a graph for another
                # flavour: this flavour's graph is made from it, without calibrating again.
                model, options = twin
            else:
                model, options = method.run(_private_copy(source, workdir), rows, workdir, flavour)
            require_fp16_safe(model, f"the {precision} graph of {label}")
            facts = _describe(model, precision, flavour)
            for target_name, check in graph_checks(flavour).items():
                problems = check(model)
                if problems:
                    raise BtDeployError(
                        f"the {precision} {flavour} graph of {label} has operators {target_name} cannot parse: "
                        f"{', '.join(problems)}"
                    )
                facts[f"{target_name}_op_check"] = "passed"
            batch.stage(model, target)
            del model
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {
        "file": target.name,
        **({"source_reason": why} if why else {}),
        "flavour": flavour,
        "precision": precision,
        **options,
        **made_by[stem],
        "graph": facts,
        **cost.to_json(),
    }
    return summary


# Keys of a quantize record that describe the graph and how it was made, not the method's options.
_RECORD_KEYS = {"file", "source", "source_reason", "source_sha256", "flavour", "precision", "calibration", "graph",
                "seconds", "peak_rss_gb", "versions", "bytes", "sha256", "parts", "reused_from"}  # fmt: skip


def _private_copy(source: Path, workdir: Path) -> Path:
    """The source graph copied into the work folder: Model Optimizer's INT8 quantizer saves its
    preprocessed graph over the file it is given (seen on tiny: model.trt.onnx changed on disk), and
    the optimized graph must stay the file its manifest records."""
    copy = workdir / source.name
    shutil.copyfile(source, copy)
    if data_file(source).is_file():
        shutil.copyfile(data_file(source), data_file(copy))
    return copy


def _twin(
    manifest: Manifest, method: QuantizeMethod, flavour: Flavour, stem: str, made_by: dict[str, dict[str, Any]]
) -> tuple[onnx.ModelProto, dict[str, Any]] | None:
    """This flavour's graph made from another flavour's graph of this precision that was made from
    the same source graph (same hash), calibration and tool versions and is intact on disk, where
    the method can convert it; or None."""
    if method.from_twin is None:
        return None
    for other in Flavour:
        record = manifest.precision_record(other, method.precision)
        if other == flavour or not method.from_twin.converts(other, flavour):
            continue
        if not manifest.up_to_date(record, {stem: made_by[stem]}):
            continue
        assert record is not None
        part = record if stem == "model" else record["parts"][stem]
        path = manifest.folder / part["file"]
        model, changed = method.from_twin.convert(load_graph(path, "quantize again"), other, flavour)
        say(f"quantize {manifest.head} {stem} ({flavour}, {method.precision}): made from {path.name} "
            f"(same source graph and calibration){', ' + str(changed) if changed else ''}")  # fmt: skip
        options = {key: value for key, value in part.items() if key not in _RECORD_KEYS}
        return model, {**options, **changed, "reused_from": path.name}
    return None


def _say_written(head: str, summary: dict[str, Any]) -> None:
    facts = ", ".join(f"{k} {v}" for k, v in summary["graph"].items() if not isinstance(v, list))
    say(f"quantize {head}: {summary['file']} ({summary['bytes'] / 2**20:.1f} MiB; {facts})")


__all__ = ["quantize_head"]
