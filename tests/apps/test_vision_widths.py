"""Configs transformers runs and the old rules refused: CLIP vision widths that are not
multiples of 64 (96: one head of 96; 130: two heads of 65), an image size that is not a multiple
of the patch, and as many cross-modal layers as text layers + 1. Each goes through the whole
pipeline: export with split towers, fuse every block, quantize every precision, check it all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_checkpoint

from btdeploy.apps.pipeline import run_pipeline
from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.checkpoints import resolve_model
from btdeploy.model.heads import HEADS

WIDTH_96: dict[str, Any] = {  # everything 96 wide, so the itc head is allowed too
    "hidden_size": 96,
    "num_attention_heads": 3,
    "num_hidden_layers": 3,  # text layers + 1: no text layer runs before the first cross layer
    "contrastive_hidden_size": 16,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "hidden_size": 96,
        "num_attention_heads": 3,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 900,
    },
    "vision_config": {"hidden_size": 96, "num_hidden_layers": 2, "image_size": 32, "patch_size": 16},
}
WIDTH_130: dict[str, Any] = {  # a 130-wide vision tower under a 64-wide model: itc refuses it
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "contrastive_hidden_size": 16,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "hidden_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "vocab_size": 900,
    },
    "vision_config": {"hidden_size": 130, "num_hidden_layers": 2, "image_size": 40, "patch_size": 16},
}


@pytest.mark.parametrize(
    ("values", "heads"),
    [(WIDTH_96, list(HEADS)), (WIDTH_130, ["base", "itm", "mlm"])],
    ids=["vision96", "vision130"],
)
def test_every_allowed_head_goes_through_the_pipeline(
    tmp_path: Path, values: dict[str, Any], heads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", values, heads=tuple(h for h in ("itm", "mlm", "itc") if h in heads))
    out = tmp_path / "out"
    # ort and trt here; trt-compat is exercised on tiny and the non-default config (tests/optimize).
    assert run_pipeline(str(checkpoint), out, seed=3, heads=heads, split=True, flavours=(Flavour.ORT, Flavour.TRT))
    printed = capsys.readouterr().out
    assert "pipeline PASSED" in printed
    for head in heads:
        manifest = read_manifest(out / head)
        for flavour in ("ort", "trt"):
            record = manifest.data["optimized"][flavour]
            expected = HEADS[head].attention_blocks(manifest.config)
            assert record["attention_fused"] == record["attention_expected"] == expected and not record["partial"]
            assert record["bridges_fused"] == record["bridges_expected"]
            for part in ("text", "vision", "fusion"):
                assert record["parts"][part]["attention_fused"] == record["parts"][part]["attention_expected"]
        assert set(manifest.data["precisions"]) == {
            "ort.fp16", "ort.int8", "ort.int8-dynamic", "trt.fp16", "trt.int8"
        }  # fmt: skip
    reports = sorted(p.name for p in out.glob("parity.*.json"))
    assert reports == sorted(
        f"parity.{k}.json"
        for k in (
            "plain",
            "split",
            "ort",
            "trt",
            "ort.fp16",
            "ort.int8",
            "ort.int8-dynamic",
            "trt.fp16",
            "trt.int8",
        )  # fmt: skip
    )
    for report in reports:
        data = json.loads((out / report).read_text())
        assert data["passed"] and {row["head"] for row in data["rows"]} == set(heads), report


def test_itc_refuses_a_vision_width_unlike_the_hidden_size(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", WIDTH_130, heads=("itm",))
    from btdeploy.export.exporter import export_head

    with pytest.raises(BtDeployError, match=r"vision hidden_size \(130\) == hidden_size \(64\)"):
        export_head(resolve_model(str(checkpoint), seed=3), "itc", tmp_path / "out")
