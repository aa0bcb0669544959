"""Multiply-accumulate FLOPs of one forward pass, counted from the config (2 FLOPs per MAC).

Counts what PyTorch computes: every Linear, the patch convolution and the attention
MatMuls. Element-wise work (LayerNorm, Softmax, GELU, adds) is left out: it is a fraction
of a percent of a BridgeTower pass and not what the matmul peak measures.
"""

from __future__ import annotations

from typing import Any

from btdeploy.model.configs import num_image_tokens
from btdeploy.model.heads import HeadSpec


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(q_tokens: int, kv_tokens: int, width: int, kv_width: int) -> int:
    """Q/K/V and output projections plus the two attention MatMuls."""
    projections = _linear(q_tokens, width, width) * 2 + _linear(kv_tokens, kv_width, width) * 2
    return projections + 2 * (2 * q_tokens * kv_tokens * width)


def _ffn(tokens: int, width: int, inner: int) -> int:
    return _linear(tokens, width, inner) + _linear(tokens, inner, width)


def forward_flops(config: Any, head: HeadSpec, batch: int, text_length: int) -> int:
    text, vision = config.text_config, config.vision_config
    hidden, cross = int(config.hidden_size), int(config.num_hidden_layers)
    tokens_t, tokens_v = text_length, num_image_tokens(config)
    width_t, width_v = int(text.hidden_size), int(vision.hidden_size)
    layers = int(text.num_hidden_layers)  # the vision tower runs in step with the text tower

    text_tower = layers * (
        _attention(tokens_t, tokens_t, width_t, width_t) + _ffn(tokens_t, width_t, text.intermediate_size)
    )
    patch = vision.patch_size
    vision_tower = _linear(tokens_v - 1, vision.num_channels * patch * patch, width_v) + layers * (
        _attention(tokens_v, tokens_v, width_v, width_v) + _ffn(tokens_v, width_v, 4 * width_v)
    )
    # Each cross layer: self-attention, cross-attention to the other modality, FFN; two stacks.
    cross_text = _attention(tokens_t, tokens_t, hidden, hidden) + _attention(tokens_t, tokens_v, hidden, hidden)
    cross_image = _attention(tokens_v, tokens_v, hidden, hidden) + _attention(tokens_v, tokens_t, hidden, hidden)
    intermediate = int(text.intermediate_size)
    cross_layers = cross * (
        cross_text + cross_image + _ffn(tokens_t, hidden, intermediate) + _ffn(tokens_v, hidden, intermediate)
    )
    # One text and one image transform into the cross-modal width per cross layer.
    transforms = cross * (_linear(tokens_t, width_t, hidden) + _linear(tokens_v, width_v, hidden))
    poolers = 2 * _linear(1, hidden, hidden)
    total = text_tower + vision_tower + cross_layers + transforms + poolers
    return batch * total + head.behaviour.extra_flops(config, batch, tokens_t, tokens_v)
