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
    ],
)
def test_configs_transformers_cannot_run_are_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(BtDeployError, match=reason):
        build_config(_tiny(**changes))


def test_a_refused_vision_width_really_fails_in_transformers() -> None:
    from transformers import BridgeTowerConfig, BridgeTowerModel

    with pytest.raises(Exception, match="divisible|num_heads"):
        BridgeTowerModel(BridgeTowerConfig(**_tiny(vision_config__hidden_size=200)))
