"""Export of every head: files, manifest, dynamic axes, parity off the export shape, failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import btdeploy
from btdeploy.errors import BtDeployError
from btdeploy.export.exporter import export_head
from btdeploy.imports import onnxruntime_distribution
from btdeploy.model.checkpoints import resolve_model
from btdeploy.model.heads import HEADS
from btdeploy.model.inputs import sample_inputs
from btdeploy.verify.check import check_export


def test_every_head_is_exported_with_a_manifest(tiny_export: Path) -> None:
    for name, head in HEADS.items():
        folder = tiny_export / name
        model = onnx.load(str(folder / "model.onnx"))
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == head.input_names
        assert [o.name for o in model.graph.output] == head.output_names
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert dims["input_ids"] == ["batch", "text_length"]
        assert dims["pixel_values"] == ["batch", 3, 64, 64]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["head"] == name and manifest["onnx"]["opset"] == 17
        assert manifest["model"]["source"] == "tiny" and manifest["model"]["missing_weights"] == []
        assert len(manifest["model"]["config_sha256"]) == 64
        assert [o["name"] for o in manifest["outputs"]] == head.output_names
        assert manifest["inputs"][0]["shape"] == ["batch", "text_length"]
        assert {"torch", "transformers", "onnx", onnxruntime_distribution()} <= set(manifest["versions"])
        assert (folder / "processor" / "tokenizer.json").is_file()
    left = [p for p in tiny_export.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert not left, "staging folders left behind"


def test_parity_at_shapes_other_than_the_export_shape(tiny_export: Path) -> None:
    # Export shape is batch 2, length 16; check 1, 3 and 5 rows at lengths 1, 9 and 40, with padding.
    rows = check_export(tiny_export, batch_sizes=(1, 3, 5), text_lengths=(1, 9, 40))
    assert len(rows) == sum(len(h.outputs) for h in HEADS.values())
    for row in rows:
        assert len(row.per_shape) == 9
        assert row.passed, f"{row.head}.{row.output}: max_abs {row.stats.max_abs:.2e} cosine {row.stats.cosine}"
        assert row.stats.max_abs <= 1e-4 and row.stats.cosine >= 0.99999
    mlm = next(r for r in rows if r.head == "mlm")
    assert mlm.stats.argmax_counted > 0.9 * mlm.stats.argmax_total
    assert mlm.stats.argmax_agree == mlm.stats.argmax_counted


def test_the_extremes_of_the_dynamic_axes_run(tiny_export: Path) -> None:
    runtime = btdeploy.load(tiny_export, head="itm")
    reference = btdeploy.load(tiny_export, head="itm", backend="torch")
    for batch, length in ((64, 6), (2, 512)):
        feeds = sample_inputs(runtime.config, batch, length, seed=9)
        got, expected = runtime(**feeds).logits, reference(**feeds).logits
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("link_tower_type", ["scaled_add", "interpolate"])
def test_non_default_config_exports_and_matches(
    non_default_checkpoint: Path, tmp_path: Path, link_tower_type: str
) -> None:
    folder = non_default_checkpoint
    if link_tower_type != "scaled_add":
        config = json.loads((folder / "config.json").read_text())
        config["link_tower_type"] = link_tower_type
        folder = tmp_path / "ckpt"
        folder.mkdir()
        for item in non_default_checkpoint.iterdir():
            (folder / item.name).symlink_to(item)
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
    source = resolve_model(str(folder), seed=3)
    out = tmp_path / "export"
    heads = ["itm", "itc", "mlm", "base"] if link_tower_type == "scaled_add" else ["itm"]
    for head in heads:
        manifest = export_head(source, head, out)
        # The interpolate config's beta parameters are not in the scaled_add checkpoint: they are
        # drawn from the seed (with a warning), and check must rebuild exactly those values.
        assert manifest.data["model"]["config"]["link_tower_type"] == link_tower_type
    rows = check_export(out, batch_sizes=(1, 4), text_lengths=(3, 21))
    assert rows and all(row.passed for row in rows), [(r.head, r.output, r.stats.max_abs) for r in rows]
    runtime = btdeploy.load(out, head="itm")
    assert runtime.config.vision_config.image_size == 48
    assert runtime(**sample_inputs(runtime.config, 2, 5)).logits.shape == (2, 2)


def test_a_model_with_few_text_positions_exports_checks_and_benches_at_the_default_lengths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_position_embeddings 12 leaves 10 tokens: the export traced at 16 (a traceback) and the
    default check lengths (5, 40) and bench lengths (16, 40, 128) refused a length nobody asked
    for, so the pipeline could not run (the rank workload's one length, 16, too). Defaults now stop
    at the model's length; a length given is still refused past it."""
    from conftest import make_checkpoint

    from btdeploy.bench.rank_workload import run_rank_bench
    from btdeploy.bench.runner import BenchSettings, run_bench
    from btdeploy.model.configs import PRESETS

    values = json.loads(json.dumps(PRESETS["tiny"]))
    values["text_config"]["max_position_embeddings"] = 12
    source = resolve_model(str(make_checkpoint(tmp_path / "ckpt", values, heads=("itm",))), seed=3)
    out = tmp_path / "export"
    export_head(source, "itm", out, split=True)
    report = tmp_path / "parity.json"
    rows = check_export(out, report=report)
    assert rows and all(row.passed for row in rows)
    assert json.loads(report.read_text())["inputs"]["text_lengths"] == [5, 10]
    with pytest.raises(BtDeployError, match=r"--seq-lens 40 is outside 1\.\.10"):
        check_export(out, text_lengths=(5, 40))
    monkeypatch.setattr("btdeploy.bench.machine.matmul_peak_gflops", lambda threads: {"torch": 100.0})
    settings = BenchSettings(batch_sizes=(1,), warmup=0, iters=1, threads=1, rotate_builds=False)
    assert settings.text_lengths is None  # the defaults
    run = run_bench(out, ["itm"], ["ort"], settings)
    assert sorted({case.text_length for case in run.cases}) == [10]
    run_rank_bench(out, 2, None, warmup=0, iters=1, threads=1, out=tmp_path / "rank")  # its one length: 16
    assert "1 image x 2 captions of length 10 " in (tmp_path / "rank" / "rank.md").read_text()


@pytest.mark.parametrize("saved_as", ["bfloat16", "float16"])
def test_a_checkpoint_saved_in_half_precision_exports_an_fp32_graph(tmp_path: Path, saved_as: str) -> None:
    """A fine-tune saved in bf16 or fp16: transformers loads it as saved, which had exported a bf16
    graph ONNX Runtime refuses to load (and called it damaged). The reference is FP32 (the weights
    widened exactly), so is the graph, and the check holds it to the FP32 floors."""
    import shutil

    import torch

    from btdeploy.model.checkpoints import ensure_preset_checkpoint

    preset = ensure_preset_checkpoint("tiny", 0)
    model = HEADS["itm"].model_class_object().from_pretrained(preset, dtype=torch.float32)
    folder = tmp_path / "fine-tune"
    model.to(getattr(torch, saved_as)).save_pretrained(folder)
    for name in preset.iterdir():  # the processor and tokenizer files
        if name.suffix in {".json", ".txt"} and not (folder / name.name).exists():
            shutil.copy(name, folder / name.name)
    manifest = export_head(resolve_model(str(folder)), "itm", tmp_path / "out")
    graph = onnx.load(str(manifest.folder / "model.onnx"))
    weight_types = {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.graph.initializer if t.dims}
    assert "FLOAT" in weight_types and not weight_types & {"BFLOAT16", "FLOAT16"}, weight_types
    rows = check_export(tmp_path / "out", batch_sizes=(2,), text_lengths=(7,))
    assert rows and all(row.passed for row in rows), [(r.output, r.stats.max_abs) for r in rows]


@pytest.mark.parametrize(
    ("exporter", "said"),
    [("torchscript", "torch.onnx.export failed"), ("dynamo", r"torch.onnx.export \(dynamo\) failed")],
)
def test_a_failed_export_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exporter: str, said: str
) -> None:
    import torch

    def broken_export(*args: object, **kwargs: object) -> None:
        if len(args) > 2:  # the TorchScript exporter is handed the file to write
            Path(str(args[2])).write_bytes(b"half a model")
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(BtDeployError, match=f"{said} for the itm head: simulated exporter crash"):
        export_head(resolve_model("tiny"), "itm", tmp_path, exporter=exporter)
    assert [p for p in tmp_path.rglob("*") if not p.name.endswith(".lock")] == []


def test_a_checkpoint_without_its_tokenizer_files_exports_without_a_processor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers builds a tokenizer of the 5 special tokens where the files are missing; kept as
    the export's processor, `run` had answered every text as if it were <unk> ... <unk>."""
    import shutil

    from btdeploy.cli import main

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(resolve_model("tiny").checkpoint, checkpoint)
    for tokenizer_file in checkpoint.glob("tokenizer*"):
        tokenizer_file.unlink()
    manifest = export_head(resolve_model(str(checkpoint)), "itm", tmp_path / "out")
    assert "its tokenizer has 5 entries for the model's vocabulary of 1000" in capsys.readouterr().err
    assert not manifest.processor_dir.exists()
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    assert main(["run", str(manifest.folder), "--image", str(image), "--text", "a cat"]) == 2
    assert "has no processor/ folder (the checkpoint had no usable processor: its tokenizer has 5 entries" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("image_processor", "made"),
    [
        ({"size": {"shortest_edge": 96}, "crop_size": {"shortest_edge": 96}}, "96x96"),
        ({"crop_size": {"shortest_edge": 48}}, "48x48"),
    ],
)
def test_a_processor_that_makes_another_image_size_is_not_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_processor: dict[str, Any], made: str
) -> None:
    """A processor_config.json for another size (or another crop) had been kept: every image was
    then refused at run time, with advice to use the checkpoint's processor, the one that made it."""
    import json
    import shutil

    from btdeploy.cli import main

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(resolve_model("tiny").checkpoint, checkpoint)
    config = json.loads((checkpoint / "processor_config.json").read_text())
    config["image_processor"].update(image_processor)
    (checkpoint / "processor_config.json").write_text(json.dumps(config))
    manifest = export_head(resolve_model(str(checkpoint)), "itm", tmp_path / "out")
    problem = f"its image processor makes {made} pixel_values of a 4:3 image, and the model takes 64x64"
    assert problem in capsys.readouterr().err
    assert not manifest.processor_dir.exists()
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    assert main(["run", str(manifest.folder), "--image", str(image), "--text", "a cat"]) == 2
    assert f"has no processor/ folder (the checkpoint had no usable processor: {problem}" in capsys.readouterr().err


def test_a_processor_btdeploy_does_not_read_whole_is_recorded_and_read_with_transformers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A setting btdeploy's own reading of the processor leaves out (model/preprocessor) is said at
    export and recorded in the manifest; `run` then reads the folder with transformers and still
    answers, as it does for a folder read both ways."""
    import json
    import shutil

    from PIL import Image

    from btdeploy.cli import main

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(resolve_model("tiny").checkpoint, checkpoint)
    config = json.loads((checkpoint / "processor_config.json").read_text())
    config["image_processor"]["do_convert_rgb"] = True
    (checkpoint / "processor_config.json").write_text(json.dumps(config))
    manifest = export_head(resolve_model(str(checkpoint)), "itm", tmp_path / "out")
    why = "image processor settings do_convert_rgb"
    assert (
        f"its processor is read with transformers at run time, which imports torch (btdeploy's own reading does "
        f"not read it: {why})" in capsys.readouterr().err
    )
    assert manifest.processor_read_by_transformers == why
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(image)
    assert main(["run", str(manifest.folder), "--image", str(image), "--text", "a cat", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)["answers"]
    assert 0 < answers[0]["match_probability"] < 1


def test_a_tokenizer_that_pads_on_the_left_is_exported_padding_on_the_right(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ITM, ITC and the pooler read each text's first token; with a checkpoint's tokenizer saved
    padding on the left, the shorter text of a batch got a pad there, and another answer than
    alone (`run` on two captions: logit -0.0725 for "a cat", -0.0575 alone)."""
    import json
    import shutil

    from PIL import Image
    from transformers import BridgeTowerProcessor

    import btdeploy

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(resolve_model("tiny").checkpoint, checkpoint)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    manifest = export_head(resolve_model(str(checkpoint)), "itm", tmp_path / "out")
    assert "its tokenizer pads on the left; BridgeTower reads each text's first token" in capsys.readouterr().err
    processor = BridgeTowerProcessor.from_pretrained(manifest.processor_dir)
    model = btdeploy.load(tmp_path / "out", head="itm")
    image = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype("uint8"))
    texts = ["a cat", "a very long caption about a cat on a mat"]
    together = model(**processor([image, image], texts, padding=True, return_tensors="np")).logits
    for row, text in enumerate(texts):
        alone = model(**processor([image], [text], return_tensors="np")).logits
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5)


def _hub_layout(preset: Path, folder: Path) -> None:
    """The files of `preset` as a checkpoint downloaded from the hub keeps them: weights in
    pytorch_model.bin, the image processor's preprocessor_config.json, the tokenizer as
    vocab.json + merges.txt (no tokenizer.json, no processor_config.json, no safetensors)."""
    import shutil

    import torch
    from transformers import BridgeTowerProcessor

    model = HEADS["mlm"].model_class_object().from_pretrained(preset, dtype=torch.float32)
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    BridgeTowerProcessor.from_pretrained(preset).image_processor.save_pretrained(folder)
    bpe = json.loads((preset / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    shutil.copy(preset / "tokenizer_config.json", folder / "tokenizer_config.json")
    # As transformers 4 saved RoBERTa's: <mask> takes the space before it (without this file
    # transformers 5 keeps that space as a token of its own, for btdeploy as for transformers).
    mask = {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False, "single_word": False}
    special: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>"}
    special |= {"pad_token": "<pad>", "cls_token": "<s>", "mask_token": mask}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def test_a_checkpoint_laid_out_as_the_hub_ships_it_answers_like_the_same_weights(
    tmp_path: Path, tiny_export: Path
) -> None:
    """What users download (BridgeTower/bridgetower-base-itm-mlm and the others) is a .bin file,
    a preprocessor_config.json and the slow tokenizer's vocab.json + merges.txt: the export reads
    all three, and its processor and graph answer as those of the same weights in btdeploy's files."""
    from PIL import Image
    from transformers import BridgeTowerProcessor

    from btdeploy.model.checkpoints import ensure_preset_checkpoint

    hub = tmp_path / "bridgetower-hub"
    _hub_layout(ensure_preset_checkpoint("tiny", 0), hub)
    assert sorted(p.name for p in hub.iterdir()) == [
        "config.json", "merges.txt", "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json",
        "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip
    manifest = export_head(resolve_model(str(hub)), "mlm", tmp_path / "out")
    assert manifest.data["model"]["missing_weights"] == []
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    texts = ["a photo of a <mask> on the grass", "two <mask>"]
    theirs = BridgeTowerProcessor.from_pretrained(manifest.processor_dir)
    ours = BridgeTowerProcessor.from_pretrained(tiny_export / "mlm" / "processor")
    encoded = theirs(images=[image, image], text=texts, padding=True, return_tensors="np")
    expected = ours(images=[image, image], text=texts, padding=True, return_tensors="np")
    assert set(encoded) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(encoded[name], expected[name], err_msg=name)
    assert len(set(encoded["input_ids"].ravel().tolist())) > 6  # words, not only special tokens
    logits = btdeploy.load(manifest.folder)(**encoded).logits
    np.testing.assert_allclose(logits, btdeploy.load(tiny_export, head="mlm")(**expected).logits, atol=1e-5, rtol=0)


def test_unsupported_opset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BtDeployError, match="--opset 9 is not supported: use 14..20"):
        export_head(resolve_model("tiny"), "itm", tmp_path, opset=9)


def test_a_model_past_the_protobuf_limit_goes_to_one_external_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import btdeploy.artifacts.onnx_files as onnx_files

    # Pretend the 2 GB limit is 1 MB, so the tiny model takes the large-model path.
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 1_000_000)
    manifest = export_head(resolve_model("tiny"), "itm", tmp_path)
    folder = tmp_path / "itm"
    assert sorted(p.name for p in folder.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert manifest.data["onnx"]["external_data"] == "model.onnx.data"
    assert (folder / "model.onnx").stat().st_size < 1_000_000 < (folder / "model.onnx.data").stat().st_size
    rows = check_export(tmp_path, batch_sizes=(2,), text_lengths=(11,))
    assert all(row.passed for row in rows)


@pytest.mark.parametrize("external", [False, True])
def test_the_export_check_refuses_a_broken_graph_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    """The exported graph is checked on a weightless copy, its weights' bytes held apart; a graph the
    ONNX checker refuses is still refused, with its reason, and nothing is written; a good one passes."""
    from onnx import TensorProto, helper

    from btdeploy.export.exporter import _store_model
    from btdeploy.export.held_weights import ExportedGraph

    if external:
        monkeypatch.setenv("BTDEPLOY_EXTERNAL_DATA_BYTES", "1024")

    def exported(inputs: list[str]) -> ExportedGraph:
        stub = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[512])  # its bytes are held apart
        graph = helper.make_graph(
            [helper.make_node("Add", inputs, ["y"], name="add")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])],
            [stub],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return ExportedGraph(model, {"w": np.ones(512, np.float32).data.cast("B")})

    assert _store_model(exported(["x", "w"]), tmp_path / "good.onnx") is external
    written = onnx.load(str(tmp_path / "good.onnx"))
    assert [onnx.numpy_helper.to_array(t).sum() for t in written.graph.initializer] == [512.0]
    with pytest.raises(BtDeployError, match="fails the ONNX checker.*not_a_tensor") as caught:
        _store_model(exported(["x", "not_a_tensor"]), tmp_path / "broken.onnx")
    assert "\n" not in str(caught.value)
    assert not list(tmp_path.glob("broken*"))


def test_the_export_patches_leave_transformers_as_they_found_it() -> None:
    """fusable_export swaps BridgeTower's forwards and mask builder for one export; afterwards,
    whether the export finished or failed, every class and the module hold what they held."""
    from transformers.models.bridgetower import modeling_bridgetower as mb

    from btdeploy.export.patches import fusable_export

    owners = [mb, mb.BridgeTowerSelfAttention, mb.BridgeTowerCrossAttention, mb.BridgeTowerResidualAttention,
              mb.BridgeTowerVisionTransformer]  # fmt: skip
    before = [dict(vars(owner)) for owner in owners]
    with fusable_export():
        assert mb.BridgeTowerSelfAttention.forward is not before[1].get("forward")
    with pytest.raises(KeyError), fusable_export():
        raise KeyError("the export failed")
    for owner, held in zip(owners, before, strict=True):
        now = vars(owner)
        assert [name for name in held.keys() | now.keys() if held.get(name) is not now.get(name)] == [], owner
