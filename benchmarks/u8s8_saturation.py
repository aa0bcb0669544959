"""The ort flavour's INT8 graphs as a CPU without VNNI runs them, emulated on any CPU.

    python benchmarks/u8s8_saturation.py DIR/itm [--graphs ort.int8,ort.int8-dynamic] [--shapes 1x5,3x40]

ONNX Runtime's integer GEMMs multiply uint8 activations by int8 weights. With AVX-512 VNNI, AVX-VNNI
or AMX each product is summed in 32 bits. Without them (AVX2 only, as on a Zen 3 or a Haswell, or
AVX-512 without VNNI) its kernel multiplies with `vpmaddubsw`, which adds the products of two
neighbouring inputs (k, k+1) in a 16-bit integer that saturates at +-32767: 255 x 127 x 2 = 64770
does not fit. The activation's zero point is taken off afterwards from the weights' column sums,
exactly. So the same graph gives different answers on the two kinds of CPU.

Each graph runs here four ways on the same generated batches: on ONNX Runtime on this CPU, as it
is and with `exact_sums` (its weights recoded to uint8 where this CPU's kernel saturates:
btdeploy/backends/exact_sums.py), and in ONNX's reference evaluator with its integer GEMMs summed
exactly or the saturating way. Each is compared with the FP32 export (the parity metrics and INT8
floors `btdeploy check` uses), and ONNX Runtime's answers are set against both emulations: on a
VNNI CPU they match the exact sums, on an AVX2 one the saturating ones; with exact_sums, the exact
ones on both. Slow on base (the reference evaluator runs in numpy): minutes a batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.graph_names import Flavour, Precision
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
from btdeploy.cli import script_entry
from btdeploy.cpu import SaturationCount, describe_cpu, exact_integer_sums, u8s8_gemm
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.verify.parity import ParityRow, check_head, generated_batches, parse_batch_by_length, shortfalls

INTEGER_GRAPHS = ("ort.int8", "ort.int8-dynamic")


def _reference_ops(saturate: bool, count: SaturationCount) -> list[Any]:
    """The operators the ort INT8 graphs hold that ONNX's reference evaluator lacks or gets wrong."""
    from onnx.reference.op_run import OpRun

    def _sums(a: np.ndarray, b: np.ndarray, a_zero: Any, b_zero: Any) -> np.ndarray:
        if b_zero is not None and np.any(b_zero):
            raise BtDeployError("a weight with a zero point: btdeploy's INT8 graphs hold symmetric weights")
        return u8s8_gemm(a, b, saturate, count, a_zero=0 if a_zero is None else a_zero)

    class MatMulInteger(OpRun):
        def _run(self, a, b, a_zero=None, b_zero=None):  # type: ignore[no-untyped-def]
            return (_sums(a, b, a_zero, b_zero).astype(np.int32),)

    class MatMulIntegerToFloat(OpRun):
        op_domain = "com.microsoft"

        def _run(self, a, b, a_scale, b_scale, a_zero=None, b_zero=None, bias=None):  # type: ignore[no-untyped-def]
            acc = _sums(a, b, a_zero, b_zero)
            y = acc.astype(np.float32) * (a_scale * b_scale).astype(np.float32)
            return ((y if bias is None else y + bias).astype(np.float32),)

    class SkipLayerNormalization(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=None):  # type: ignore[no-untyped-def]
            total = x + skip + (0 if bias is None else bias)
            mean = total.mean(-1, keepdims=True)
            variance = ((total - mean) ** 2).mean(-1, keepdims=True)
            y = (total - mean) / np.sqrt(variance + (1e-12 if epsilon is None else epsilon)) * gamma
            y = y if beta is None else y + beta
            return tuple(v.astype(np.float32) for v in (y, mean, variance, total))

    class QuickGelu(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, alpha=None):  # type: ignore[no-untyped-def]
            return ((x / (1 + np.exp(-(1.702 if alpha is None else alpha) * x))).astype(np.float32),)

    class BiasGelu(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, bias):  # type: ignore[no-untyped-def]
            import torch

            return (torch.nn.functional.gelu(torch.from_numpy((x + bias).astype(np.float32))).numpy(),)

    class GatherElements(OpRun):  # the reference's own fails on [B, L] indices
        def _run(self, data, indices, axis=None):  # type: ignore[no-untyped-def]
            axis = axis or 0
            return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis], indices), axis=axis),)

    return [MatMulInteger, MatMulIntegerToFloat, SkipLayerNormalization, QuickGelu, BiasGelu, GatherElements]


class EmulatedIntegerSums:
    """A graph in ONNX's reference evaluator, its integer GEMMs summed exactly or saturating."""

    name = "onnx-reference"

    def __init__(self, path: Path, output_names: list[str], saturate: bool) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.count = SaturationCount()
        model = onnx.load(str(path))
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = output_names
        self.evaluator = ReferenceEvaluator(model, new_ops=_reference_ops(saturate, self.count))
        self.description = f"{path.name}, integer sums {'saturating in int16 pairs' if saturate else 'exact'}"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.evaluator.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, values, strict=True))


class Recording:
    """A backend that keeps what it returned, batch by batch."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.name, self.description = backend, backend.name, backend.description
        self.outputs: list[dict[str, np.ndarray]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.outputs.append(self.backend.run(feeds))
        return self.outputs[-1]


def _largest_difference(a: Recording, b: Recording) -> float:
    return max(float(np.abs(x[n] - y[n]).max()) for x, y in zip(a.outputs, b.outputs, strict=True) for n in x)


def _row(graph: str, kind: str, rows: list[ParityRow]) -> dict[str, Any]:
    worst = min(rows, key=lambda r: r.stats.cosine)
    missed = [f"{r.output}: {'; '.join(shortfalls(r.stats, r.tolerance))}" for r in rows if not r.passed]
    return {
        "graph": graph,
        "integer_sums": kind,
        "output": worst.output,
        "max_abs": worst.stats.max_abs,
        "of_range": worst.stats.of_range,
        "cosine": worst.stats.cosine,
        "passed": not missed,
        "missed": missed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("head_dir", type=Path, help="an exported head folder with its ort INT8 graphs")
    parser.add_argument("--graphs", default="ort.int8,ort.int8-dynamic", help="flavour.precision, comma list")
    parser.add_argument("--shapes", default="1x5,3x40", help="batch x text length, comma list")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    manifest = read_manifest(args.head_dir)
    head = get_head(manifest.head)
    names = list(head.output_names)
    shapes = parse_batch_by_length(args.shapes, manifest.config)
    graphs = args.graphs.split(",")
    others = [g for g in graphs if g not in INTEGER_GRAPHS]
    if others:
        raise BtDeployError(
            f"--graphs {','.join(others)}: only {' and '.join(INTEGER_GRAPHS)} hold ONNX Runtime's integer GEMMs "
            "(the trt graphs hold Q/DQ, which ONNX Runtime fuses on its own)"
        )
    exact_here = exact_integer_sums()
    print(f"CPU: {describe_cpu()}")
    sums = f"exact ({', '.join(exact_here)})" if exact_here else "saturating"
    print(f"ONNX Runtime's u8 x s8 sums here: {sums}")
    reference = OnnxRuntimeBackend(manifest.graph_path(), names, ["cpu"])
    results, agreement = [], []
    for graph in graphs:
        flavour, precision = graph.split(".", 1)
        path = manifest.graph_path(Flavour(flavour), Precision(precision))
        candidates = {
            "onnxruntime here": Recording(OnnxRuntimeBackend(path, names, ["cpu"])),
            # exact_sums: the weights recoded to uint8 where this CPU's kernel would saturate
            "onnxruntime here, exact_sums": Recording(OnnxRuntimeBackend(path, names, ["cpu"], exact_sums=True)),
            "exact (VNNI, AMX)": Recording(EmulatedIntegerSums(path, names, saturate=False)),
            "saturating (AVX2)": Recording(EmulatedIntegerSums(path, names, saturate=True)),
        }
        for kind, backend in candidates.items():
            print(f"[{graph}] {kind} ...", flush=True)
            batches = generated_batches(manifest.config, shapes, seed=args.seed)
            results.append(_row(graph, kind, check_head(head, reference, backend, batches, "int8")))
        count = candidates["saturating (AVX2)"].backend.count
        here, here_exact, exact, saturating = candidates.values()
        agreement.append({
            "graph": graph,
            "saturated_pairs": count.saturated,
            "pairs": count.pairs,
            "onnxruntime_vs_exact": _largest_difference(here, exact),
            "onnxruntime_vs_saturating": _largest_difference(here, saturating),
            "onnxruntime_exact_sums_vs_exact": _largest_difference(here_exact, exact),
            "onnxruntime_exact_sums_vs_saturating": _largest_difference(here_exact, saturating),
            "exact_vs_saturating": _largest_difference(exact, saturating),
        })  # fmt: skip

    print(f"\n{manifest.head}, shapes {args.shapes}, against the FP32 export (worst output by cosine)\n")
    print("| graph | integer sums | output | max abs | of range | cosine | INT8 floors |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in results:
        verdict = "pass" if r["passed"] else "MISSED: " + "; ".join(r["missed"])
        print(f"| {r['graph']} | {r['integer_sums']} | {r['output']} | {r['max_abs']:.3e} | {r['of_range']:.4f} | "
              f"{r['cosine']:.6f} | {verdict} |")  # fmt: skip
    print("\n| graph | saturated pairs | ONNX Runtime here vs exact | vs saturating | with exact_sums vs exact | "
          "vs saturating | exact vs saturating |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a in agreement:
        share = a["saturated_pairs"] / max(a["pairs"], 1)
        print(f"| {a['graph']} | {a['saturated_pairs']} of {a['pairs']} ({share:.2e}) | "
              f"{a['onnxruntime_vs_exact']:.3e} | {a['onnxruntime_vs_saturating']:.3e} | "
              f"{a['onnxruntime_exact_sums_vs_exact']:.3e} | {a['onnxruntime_exact_sums_vs_saturating']:.3e} | "
              f"{a['exact_vs_saturating']:.3e} |")  # fmt: skip
    if args.json:
        report = {"cpu": describe_cpu(), "exact_sums_here": bool(exact_here), "rows": results, "agreement": agreement}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    script_entry(main)
