"""`btdeploy bench --workload serve --variants`: the bench's variant names, served by `btdeploy serve`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import spying

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.targets import bench_variants
from btdeploy.bench.load import ServedVariant, served_variants
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.serve.settings import BACKENDS, ServeSettings, rank_unserved

SERVABLE = [name for name, (target, _) in bench_variants().items() if target.name in BACKENDS]


@pytest.mark.parametrize("name", SERVABLE)
def test_each_variants_flags_make_serve_run_that_variant(
    name: str, tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flags the bench starts the server with, read by serve's own parser, ask for the same
    backend and run options as the variant the bench runs in its own process."""
    from btdeploy.serve import server

    served = ServedVariant.named(name)
    asked: list[ServeSettings] = []
    monkeypatch.setattr(server, "serve_export", spying(lambda settings: 0, lambda settings: asked.append(settings)))
    assert main(["serve", str(tiny_export), *served.server_arguments()]) == 0
    settings = asked[0]
    assert settings.backend == bench_variants()[name][0].name
    run = {key: str(value) for key, value in settings.run_options(split=False).items() if key != "split"}
    expected = {"precision": "fp32", **{key: str(value) for key, value in served.options.items()}}
    assert run == expected


def test_served_variants_carry_what_serve_needs(served_export: Path) -> None:
    manifest = read_manifest(served_export / "itm")
    fused, dynamic, openvino = served_variants(["ort-fused", "ort-int8-dynamic", "openvino-fused-fp32"], manifest)
    assert fused.server_arguments() == ["--backend", "onnxruntime", "--flavour", "ort"]
    assert dynamic.server_arguments() == [
        "--backend", "onnxruntime", "--flavour", "ort", "--precision", "int8-dynamic"
    ]  # fmt: skip
    assert openvino.server_arguments() == ["--backend", "openvino", "--flavour", "trt"]
    assert rank_unserved(fused.target.name, manifest) is None
    assert rank_unserved(openvino.target.name, manifest) is None  # OpenVINO runs the split towers too


def test_every_problem_with_the_variants_is_one_line_before_a_server_starts(tiny_export: Path) -> None:
    manifest = read_manifest(tiny_export / "itm")
    with pytest.raises(BtDeployError) as error:
        served_variants(["ort-fusd", "torch-eager", "ort-int8"], manifest)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--workload serve: unknown variant 'ort-fusd' (serve runs ort, ort-fused,")
    assert "torch-eager runs on torch, which btdeploy serve does not run" in message
    assert re.search(r"ort-int8: .*btdeploy quantize", message), message  # the command that makes the graph


def test_rank_is_left_out_where_the_export_has_no_split_towers(tiny_export: Path) -> None:
    manifest = read_manifest(tiny_export / "itm")
    (plain,) = served_variants(["ort"], manifest)
    assert (
        rank_unserved(plain.target.name, manifest)
        == f"{manifest.folder} has no split graphs (btdeploy export --split makes them)"
    )


def test_the_serve_bench_serves_an_openvino_variant(served_export: Path, tmp_path: Path) -> None:
    """End to end on 127.0.0.1: OpenVINO replicas with batching and without, and its rank endpoint on
    the split towers, every answer held to the same requests run through btdeploy.load on OpenVINO
    in this process."""
    out = tmp_path / "bench"
    arguments = ["--variants", "openvino-fused-fp32", "--concurrency", "2", "--requests", "4", "--max-batch", "2"]
    arguments += ["--captions", "3", "--seq-lens", "6", "--out", str(out)]
    assert main(["bench", str(served_export), "--workload", "serve", *arguments]) == 0
    levels: list[dict[str, Any]] = json.loads((out / "serve.json").read_text())["levels"]
    served = {(level["workload"], level["mode"]): level for level in levels}
    itm, rank = "itm openvino-fused-fp32", "rank openvino-fused-fp32"
    modes = ("batching", "no batching", "in-process", "in-process, 1 at a time")
    assert set(served) == {(itm, mode) for mode in modes} | {(rank, "in-process"), (rank, "batching")}
    for key, requests in [((itm, "batching"), 4), ((itm, "no batching"), 4), ((rank, "batching"), 4)]:
        level = served[key]
        assert (level["requests"], level["errors"], level["wrong"]) == (requests, 0, 0), level
    assert served[itm, "no batching"]["batch_sizes"] == {"1": 4}
    assert served[rank, "batching"]["batch_sizes"] == {"1": 4}  # the rank replica scored every request
    assert "not run" not in (out / "serve.md").read_text()
    assert (out / "serve.png").stat().st_size > 0
