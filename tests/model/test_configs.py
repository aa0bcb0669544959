"""Config rules: each is a constraint transformers really has, refused with its reason."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from btdeploy.errors import BtDeployError
from btdeploy.model.configs import PRESETS, build_config


def _tiny(**changes: Any) -> dict[str, Any]:
    values = copy.deepcopy(PRESETS["tiny"])
    for key, value in changes.items():
        target = values
        *path, leaf = key.split("__")
        for part in path:
            target = target[part]
        target[leaf] = value
    return values


@pytest.mark.parametrize(
    "changes",
    [
        {"vision_config__hidden_size": 96},  # one CLIP head of 96
        {"vision_config__hidden_size": 130},  # two heads of 65
        {"vision_config__image_size": 70},  # not a multiple of the patch: the convolution floors
        {"num_hidden_layers": 4},  # text layers + 1
        {"vision_config__remove_last_layer": True, "vision_config__num_hidden_layers": 4},  # 3 CLIP blocks built
        {"vision_config__share_layernorm": False},  # per-layer LayerNorms the model never calls
        {"init_layernorm_from_vision_encoder": True},  # with the shared LayerNorm: nothing to copy
    ],
)
def test_configs_transformers_runs_are_accepted(changes: dict[str, Any]) -> None:
    import torch
    from transformers import BridgeTowerForImageAndTextRetrieval

    config = build_config(_tiny(**changes))
    model = BridgeTowerForImageAndTextRetrieval(config).eval()
    size = config.vision_config.image_size
    with torch.no_grad():
        logits = model(
            input_ids=torch.randint(5, 100, (1, 6)),
            attention_mask=torch.ones(1, 6, dtype=torch.long),
            pixel_values=torch.randn(1, 3, size, size),
        ).logits
    assert logits.shape == (1, 2)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"vision_config__hidden_size": 32}, r"hidden_size // 64 = 0 attention head"),
        ({"vision_config__hidden_size": 200}, r"hidden_size // 64 = 3 attention head"),
        ({"num_hidden_layers": 5}, r"between 1 and the text layer count \+ 1 \(4\)"),
        ({"vision_config__num_hidden_layers": 2}, r"the vision tower has 2 layers but the text tower 3"),
        ({"text_config__hidden_size": 96, "text_config__num_attention_heads": 4}, r"text hidden_size 96 differs"),
        ({"text_config__num_attention_heads": 3}, r"not a multiple of num_attention_heads 3"),
        ({"share_link_tower_layers": True}, r"share_link_tower_layers=True is broken in transformers"),
        (
            {"vision_config__remove_last_layer": True},
            r"the vision tower has 2 layers \(num_hidden_layers less one: remove_last_layer=True\) but the text",
        ),
        (
            {"vision_config__share_layernorm": False, "init_layernorm_from_vision_encoder": True},
            r"init_layernorm_from_vision_encoder=True with vision_config.share_layernorm=False is broken",
        ),
    ],
)
def test_configs_transformers_cannot_run_are_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(BtDeployError, match=reason):
        build_config(_tiny(**changes))


def test_a_refused_vision_width_really_fails_in_transformers() -> None:
    from transformers import BridgeTowerConfig, BridgeTowerModel

    with pytest.raises(Exception, match="divisible|num_heads"):
        BridgeTowerModel(BridgeTowerConfig(**_tiny(vision_config__hidden_size=200)))


@pytest.mark.parametrize(
    ("changes", "failure"),
    [
        ({"vision_config__remove_last_layer": True}, r"index 2 is out of range"),
        (
            {"vision_config__share_layernorm": False, "init_layernorm_from_vision_encoder": True},
            r"has no attribute 'cross_modal_ln_separate'",
        ),
    ],
)
def test_the_refused_layer_configs_really_fail_in_transformers(changes: dict[str, Any], failure: str) -> None:
    import torch
    from transformers import BridgeTowerConfig, BridgeTowerModel

    config = BridgeTowerConfig(**_tiny(**changes))
    vision: Any = config.vision_config  # transformers types it as a config, a dict or None
    size = vision.image_size
    with pytest.raises((IndexError, AttributeError), match=failure), torch.no_grad():
        BridgeTowerModel(config).eval()(
            input_ids=torch.randint(5, 100, (1, 6)), pixel_values=torch.randn(1, 3, size, size)
        )


def test_feed_forward_chunking_is_taken_out_from_a_preset_dict_and_a_checkpoint(tmp_path: Any) -> None:
    """chunk_size_feed_forward N has transformers run only lengths that are multiples of N (the
    export failed on 17 image tokens at N=4); whole feed-forward layers give the same outputs."""
    import json

    import torch
    from transformers import BridgeTowerConfig, BridgeTowerModel

    from btdeploy.model.checkpoints import ModelSource, load_config

    chunked = _tiny(text_config__chunk_size_feed_forward=4)
    size = chunked["vision_config"]["image_size"]
    feeds = {"input_ids": torch.randint(5, 100, (1, 6)), "pixel_values": torch.randn(1, 3, size, size)}
    with pytest.raises(ValueError, match="has to be a multiple of the chunk size 4"), torch.no_grad():
        BridgeTowerModel(BridgeTowerConfig(**chunked)).eval()(**feeds)
    config = build_config(chunked)
    assert config.text_config.chunk_size_feed_forward == 0
    with torch.no_grad():
        assert BridgeTowerModel(config).eval()(**feeds).pooler_output.shape == (1, 2 * config.hidden_size)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["text_config"]["chunk_size_feed_forward"] = 4
    (folder / "config.json").write_text(json.dumps(saved))
    assert load_config(ModelSource(str(folder))).text_config.chunk_size_feed_forward == 0
