"""Architecture presets and the config rules btdeploy enforces before any model is built."""

from __future__ import annotations

from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.imports import serial_imports
from btdeploy.progress import say

# Released checkpoints carry these in config.json; transformers 5.x does not declare them,
# and the contrastive head needs them.
CONTRASTIVE_DEFAULTS = {"contrastive_hidden_size": 512, "logit_scale_init_value": 2.6592}

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough that a test exports a head in about a second, yet every structural
    # feature is present: 2 vision heads (CLIP uses hidden // 64 heads), 2 cross layers
    # (so one link tower per modality), an image size the processor must resize to.
    "tiny": {
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "contrastive_hidden_size": 32,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "hidden_size": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "intermediate_size": 256,
            "vocab_size": 1000,
        },
        "vision_config": {"hidden_size": 128, "num_hidden_layers": 3, "image_size": 64, "patch_size": 16},
    },
    # bridgetower-base: RoBERTa-base + CLIP ViT-B/16 at 288 px, 6 cross layers.
    "base": {
        **CONTRASTIVE_DEFAULTS,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "num_hidden_layers": 6,
        "text_config": {
            "hidden_size": 768,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "intermediate_size": 3072,
            "vocab_size": 50265,
        },
        "vision_config": {"hidden_size": 768, "num_hidden_layers": 12, "image_size": 288, "patch_size": 16},
    },
    # bridgetower-large: RoBERTa-large + CLIP ViT-L/14 at 294 px, 6 cross layers.
    "large": {
        **CONTRASTIVE_DEFAULTS,
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_hidden_layers": 6,
        "text_config": {
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "intermediate_size": 4096,
            "vocab_size": 50265,
        },
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "image_size": 294, "patch_size": 14},
    },
}

LINK_TOWER_TYPES = ("add", "scaled_add", "interpolate")


def build_config(preset_or_dict: str | dict[str, Any]) -> Any:
    """A BridgeTowerConfig from a preset name or a config dict, validated, eager attention."""
    with serial_imports():
        from transformers import BridgeTowerConfig

    if isinstance(preset_or_dict, str):
        if preset_or_dict not in PRESETS:
            raise BtDeployError(f"unknown preset {preset_or_dict!r}: choose one of {', '.join(PRESETS)}")
        values = PRESETS[preset_or_dict]
    else:
        values = preset_or_dict
    config = BridgeTowerConfig(**values)
    validate_config(config)
    unchunk_feed_forward(config)
    return config


_UNCHUNKED_SAID: list[bool] = []


def unchunk_feed_forward(config: Any) -> None:
    """Run the feed-forward layers whole. chunk_size_feed_forward N splits them along the tokens to
    save memory, with the same outputs, and transformers then runs only inputs whose length is a
    multiple of N (the export failed on the tiny preset's 17 image tokens for N=4). Said once per process."""
    chunked = [part for part in (config, config.text_config) if getattr(part, "chunk_size_feed_forward", 0)]
    if chunked and not _UNCHUNKED_SAID:
        _UNCHUNKED_SAID.append(True)
        say(f"config: chunk_size_feed_forward {chunked[0].chunk_size_feed_forward} taken as 0 (the feed-forward "
            "layers run whole: the same outputs, at any input length)")  # fmt: skip
    for part in chunked:
        part.chunk_size_feed_forward = 0


def validate_config(config: Any) -> None:
    """Refuse configs that transformers itself cannot run, with the reason and the fix."""
    text, vision = config.text_config, config.vision_config
    if not config.share_cross_modal_transformer_layers:
        raise BtDeployError(
            "share_cross_modal_transformer_layers=False is broken in transformers itself "
            "(the per-layer transforms are indexed past their list); set it to True"
        )
    if config.share_link_tower_layers:
        raise BtDeployError(
            "share_link_tower_layers=True is broken in transformers itself "
            "(the shared link tower is indexed like a list); set it to False"
        )
    if config.link_tower_type not in LINK_TOWER_TYPES:
        raise BtDeployError(
            f"link_tower_type {config.link_tower_type!r} is not supported: use one of {', '.join(LINK_TOWER_TYPES)}"
        )
    if text.hidden_size != config.hidden_size:
        raise BtDeployError(
            f"text hidden_size {text.hidden_size} differs from the cross-modal hidden_size {config.hidden_size}: "
            "the cross-modal layers are built from the text config, so they must be equal"
        )
    if text.hidden_size % text.num_attention_heads:
        raise BtDeployError(
            f"text hidden_size {text.hidden_size} is not a multiple of num_attention_heads {text.num_attention_heads}"
        )
    vision_heads = vision.hidden_size // 64  # what transformers' CLIP tower uses
    if vision_heads < 1 or vision.hidden_size % vision_heads:
        raise BtDeployError(
            f"vision hidden_size {vision.hidden_size} does not run in transformers: the CLIP vision tower uses "
            f"hidden_size // 64 = {vision_heads} attention head(s), so the width must be at least 64 and divide "
            "evenly into them (96: one head of 96, 130: two heads of 65)"
        )
    # transformers runs the first text_layers - cross_layers + 1 uni-modal layers alone; a negative
    # count would index layers from the end and compute something else without an error.
    if not 1 <= config.num_hidden_layers <= text.num_hidden_layers + 1:
        raise BtDeployError(
            f"num_hidden_layers (cross-modal layers) is {config.num_hidden_layers}; it must be between 1 and "
            f"the text layer count + 1 ({text.num_hidden_layers + 1})"
        )
    # remove_last_layer builds one CLIP block fewer than num_hidden_layers says.
    vision_layers = vision.num_hidden_layers - int(bool(getattr(vision, "remove_last_layer", False)))
    if vision_layers < text.num_hidden_layers:
        removed = (
            " (num_hidden_layers less one: remove_last_layer=True)" if vision_layers < vision.num_hidden_layers else ""
        )
        raise BtDeployError(
            f"the vision tower has {vision_layers} layers{removed} but the text tower {text.num_hidden_layers}: "
            "BridgeTower walks both towers in step, so the vision tower needs at least as many"
        )
    if not getattr(vision, "share_layernorm", True) and getattr(config, "init_layernorm_from_vision_encoder", False):
        raise BtDeployError(
            "init_layernorm_from_vision_encoder=True with vision_config.share_layernorm=False is broken in "
            "transformers itself (it copies ln_post into cross_modal_ln_separate, which the vision tower does "
            "not have); set init_layernorm_from_vision_encoder to False: it only initialises weights, which "
            "the checkpoint's own replace"
        )
    if vision.image_size < vision.patch_size:
        raise BtDeployError(f"image_size {vision.image_size} is smaller than one patch ({vision.patch_size})")
    if text.max_position_embeddings < 3:
        raise BtDeployError("max_position_embeddings must be at least 3 (two are reserved by RoBERTa's padding)")


def max_text_length(config: Any) -> int:
    """RoBERTa positions start after the padding id, so two position rows are never used by text."""
    return int(config.text_config.max_position_embeddings) - int(config.text_config.pad_token_id) - 1


def num_image_tokens(config: Any) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def config_fingerprint(config: Any) -> str:
    """A hash of the architecture, stable across runs: private and version keys left out."""
    from btdeploy.artifacts.files import sha256_of_json

    def clean(data: Any) -> Any:
        if isinstance(data, dict):
            return {
                key: clean(value)
                for key, value in data.items()
                if not str(key).startswith("_") and key not in ("transformers_version", "architectures", "dtype")
            }
        return data

    return sha256_of_json(clean(config.to_dict()))
