"""Presets, seeded random weights, config refusals and checkpoint loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import NON_DEFAULT_CONFIG, make_checkpoint

from btdeploy.errors import BtDeployError
from btdeploy.model.checkpoints import load_head_model, randomize_, resolve_model
from btdeploy.model.configs import build_config, max_text_length, num_image_tokens
from btdeploy.model.heads import HEADS


def _tiny_model(seed: int) -> torch.nn.Module:
    model = HEADS["itm"].model_class_object()(build_config("tiny"))
    randomize_(model, seed)
    return model


def test_random_weights_are_non_trivial_for_every_bias_and_layernorm() -> None:
    model = _tiny_model(0)
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(layer_norms) > 10
    for norm in layer_norms:
        assert (norm.weight - 1).abs().max() > 0.05, "LayerNorm weight left at 1"
        assert norm.bias.abs().max() > 0.05, "LayerNorm bias left at 0"
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    assert len(biases) > 20
    for name, bias in biases:
        assert bias.abs().max() > 0.01, f"{name} left at 0"


def test_random_weights_depend_on_the_seed_only() -> None:
    first, again, other = (dict(_tiny_model(s).named_parameters()) for s in (0, 0, 1))
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert not torch.equal(first["itm_score.fc.bias"], other["itm_score.fc.bias"])


def test_the_written_weights_do_not_depend_on_transformers_init(tmp_path: Path) -> None:
    # write_random_checkpoint skips transformers' init (randomize_ draws every parameter anyway):
    # its weights must equal a model built with that init and then randomized.
    from safetensors.torch import load_file

    folder = make_checkpoint(tmp_path / "ckpt", NON_DEFAULT_CONFIG, seed=5, heads=("mlm",))
    written = load_file(str(folder / "model.safetensors"))
    torch.manual_seed(5)
    model = HEADS["mlm"].model_class_object()(build_config(copy.deepcopy(NON_DEFAULT_CONFIG)))
    randomize_(model, 5)
    expected = model.state_dict()
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert torch.equal(written[name], value), name


def test_preset_checkpoint_loads_every_head_with_no_missing_weights() -> None:
    source = resolve_model("tiny")
    shared = None
    for head in HEADS.values():
        loaded = load_head_model(source, head)
        assert loaded.missing_weights == []
        assert loaded.model.config._attn_implementation == "eager"
        weight = dict(loaded.model.named_parameters())
        key = next(k for k in weight if k.endswith("embeddings.word_embeddings.weight"))
        if shared is None:
            shared = weight[key].detach().clone()
        assert torch.equal(shared, weight[key]), "shared weights differ between heads"


def test_the_reference_loads_where_the_kernels_package_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.25 asks for hub kernels by default and raised "Kernels are not available" where
    the `kernels` package was missing (the H200 machine's own environment): btdeploy asks for none."""
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "is_kernels_available", lambda *args, **kwargs: False)
    loaded = load_head_model(resolve_model("tiny"), HEADS["itm"])
    assert not loaded.model.use_kernels


def test_a_preset_written_meanwhile_by_another_process_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two commands on a fresh machine both write the preset: the second had moved the first's
    folder aside and deleted it, from under a process reading its weights. The first now stays
    (the bytes are the same: seeded) and the second's copy is dropped."""
    from btdeploy.model import checkpoints

    monkeypatch.setenv("BTDEPLOY_CACHE", str(tmp_path / "cache"))
    folder = checkpoints.preset_checkpoint_dir("tiny", 0)
    write = checkpoints.write_random_checkpoint

    def written_by_both(config: object, staging: Path, seed: int) -> None:
        write(config, staging, seed)
        folder.mkdir()  # the other process finishes first
        (folder / "config.json").write_text((staging / "config.json").read_text())
        (folder / "weights-in-use").write_text("")

    monkeypatch.setattr(checkpoints, "write_random_checkpoint", written_by_both)
    assert checkpoints.ensure_preset_checkpoint("tiny", 0) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights-in-use"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staged copy left behind


def test_a_cache_that_cannot_be_written_is_one_line_naming_btdeploy_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache comes from $HOME or BTDEPLOY_CACHE, not from the command line: the error says
    which setting to change, where the system's error named only a path the user never gave."""
    from btdeploy.model import checkpoints

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BTDEPLOY_CACHE", str(tmp_path / "a-file"))
    assert checkpoints.cache_problem() == f"{tmp_path / 'a-file'} is a file"
    with pytest.raises(
        BtDeployError,
        match=r"cannot write the tiny preset checkpoint to .*a-file/checkpoints/tiny-seed0-v2 \(Not a directory.*\): "
        "set BTDEPLOY_CACHE to a writable folder",
    ):
        checkpoints.ensure_preset_checkpoint("tiny", 0)
    monkeypatch.setenv("BTDEPLOY_CACHE", str(tmp_path / "not" / "yet"))
    assert checkpoints.cache_problem() is None  # made on first use
    assert checkpoints.cached_checkpoints() == []


def test_doctor_shows_the_cached_presets_and_those_of_an_older_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from btdeploy.apps.doctor import doctor_report
    from btdeploy.model import checkpoints

    monkeypatch.setenv("BTDEPLOY_CACHE", str(tmp_path))
    current = checkpoints.preset_checkpoint_dir("base", 3)
    older = current.with_name(f"base-seed3-v{checkpoints.CHECKPOINT_FORMAT - 1}")
    for folder, size in [(current, 3_000_000), (older, 250_000_000)]:
        folder.mkdir(parents=True)
        with open(folder / "model.safetensors", "wb") as handle:
            handle.truncate(size)  # sparse: the size counts, not the disk it takes
    assert [(c.folder, c.current, c.size_bytes) for c in checkpoints.cached_checkpoints()] == [
        (older, False, 250_000_000),
        (current, True, 3_000_000),
    ]
    line = next(line for line in doctor_report()[0] if line.startswith("checkpoints"))
    assert f"{tmp_path / 'checkpoints'} (BTDEPLOY_CACHE moves it): {current.name} 3 MB; " in line
    assert f"1 of an older format that nothing reads (250 MB): {older.name} -> can be deleted" in line


def test_preset_checkpoint_has_a_working_processor() -> None:
    from PIL import Image
    from transformers import BridgeTowerProcessor

    folder = resolve_model("tiny").checkpoint
    processor = BridgeTowerProcessor.from_pretrained(folder)
    image = Image.new("RGB", (150, 90), (200, 30, 40))
    encoding = processor(image, "a <mask> looking out of the window", return_tensors="np")
    assert encoding["pixel_values"].shape == (1, 3, 64, 64)
    ids = encoding["input_ids"][0].tolist()
    assert ids[0] == 0 and ids[-1] == 2, "RoBERTa framing <s> ... </s>"
    assert processor.tokenizer.mask_token_id == 4 and 4 in ids
    assert processor.tokenizer.pad_token_id == 1


def test_sizes_of_the_presets() -> None:
    base = build_config("base")
    assert num_image_tokens(base) == 325 and max_text_length(base) == 512
    assert num_image_tokens(build_config("large")) == 442


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"share_cross_modal_transformer_layers": False}, "share_cross_modal_transformer_layers=False is broken"),
        ({"share_link_tower_layers": True}, "share_link_tower_layers=True is broken"),
        ({"link_tower_type": "concat"}, "link_tower_type 'concat' is not supported"),
        ({"vision_config": {**NON_DEFAULT_CONFIG["vision_config"], "hidden_size": 32}}, "at least 64"),
        ({"vision_config": {**NON_DEFAULT_CONFIG["vision_config"], "num_hidden_layers": 3}}, "at least as many"),
        ({"vision_config": {**NON_DEFAULT_CONFIG["vision_config"], "patch_size": 60}}, "smaller than one patch"),
        ({"num_hidden_layers": 9}, "must be between 1 and the text layer count"),
    ],
)
def test_configs_transformers_cannot_run_are_refused(change: dict, message: str) -> None:
    values = {**copy.deepcopy(NON_DEFAULT_CONFIG), **change}
    with pytest.raises(BtDeployError, match=message):
        build_config(values)


def test_itc_refuses_a_vision_width_unlike_the_hidden_size(tmp_path: Path) -> None:
    values = copy.deepcopy(NON_DEFAULT_CONFIG)
    values["vision_config"]["hidden_size"] = 128
    folder = make_checkpoint(tmp_path / "wide-vision", values, heads=("itm",))
    source = resolve_model(str(folder))
    assert load_head_model(source, HEADS["itm"]).missing_weights == []
    with pytest.raises(BtDeployError, match="itc head .* needs vision hidden_size \\(128\\) == hidden_size \\(64\\)"):
        load_head_model(source, HEADS["itc"])


def test_model_argument_that_is_neither_preset_nor_folder(tmp_path: Path) -> None:
    with pytest.raises(BtDeployError, match="neither a preset .* nor a checkpoint folder"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(BtDeployError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_missing_head_weights_are_drawn_from_the_seed_with_a_loud_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_checkpoint(tmp_path / "itm-mlm-only", NON_DEFAULT_CONFIG, heads=("itm", "mlm"))
    source = resolve_model(str(folder), seed=7)
    first = load_head_model(source, HEADS["itc"])
    warning = capsys.readouterr().err
    assert "WARNING" in warning and "itc_text_head.fc.weight" in warning and "RANDOM (seed 7)" in warning
    assert "logit_scale" in first.missing_weights and "itc_image_head.fc.bias" in first.missing_weights
    again = load_head_model(source, HEADS["itc"])
    for name in first.missing_weights:
        assert torch.equal(first.model.get_parameter(name), again.model.get_parameter(name)), name
    assert first.model.itc_text_head.fc.bias.abs().max() > 0.01
