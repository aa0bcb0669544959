"""Export-time patches: the same maths as transformers, written so every block exports as one
canonical, fusable pattern. Applied only while exporting; the PyTorch reference is untouched,
and `check` holds the patched export to the unpatched reference.

What changes in the exported graph, and why:
- Attention (text, vision, both cross-modal stacks) is one shared function: explicit Q, K, V
  projections (the vision tower's packed in-projection is split), the 1/sqrt(d) scale applied
  to Q before Q.K^T (where TensorRT's fused attention wants it), a head reshape with the head
  count as a constant, MatMul -> (mask Add) -> Softmax -> MatMul. The graph passes match this
  one pattern for all blocks.
- The vision tower runs batch-first ([batch, tokens, width]) instead of CLIP's sequence-first
  layout, so its attention has the same layout as the others and no transposes around it.
- The text mask is one additive FP32 tensor, (1 - mask) * -10000, built once from the
  `attention_mask` input: finite, so it cannot become -inf (and NaN) in FP16, and easy to
  trace back to the input for the fused operators' own mask inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from btdeploy.imports import serial_imports
from btdeploy.swaps import replaced

MASK_VALUE = -10000.0  # exp(-10000) is 0 in FP32 and FP16, like finfo.min, but finite


def _attention(
    query_states: Any, kv_states: Any, q_proj: Any, k_proj: Any, v_proj: Any, heads: int, head_size: int, mask: Any
) -> Any:
    """Multi-head attention in the canonical exported form; returns [batch, q_tokens, width].

    `heads` and `head_size` are Python ints, so they are constants in the head reshape (the
    fusion reads the head count from there); only batch and token counts are dynamic.
    """
    import torch

    # Each reshape reads the shape of its own input only, so a block's K/V do not depend on
    # its query (the [CLS]-rows pass shrinks the query alone).
    batch, q_tokens = query_states.shape[0], query_states.shape[1]
    kv_batch, kv_tokens = kv_states.shape[0], kv_states.shape[1]
    width = heads * head_size
    scale = head_size**-0.5
    query = (q_proj(query_states) * scale).reshape(batch, q_tokens, heads, head_size).transpose(1, 2)
    key = k_proj(kv_states).reshape(kv_batch, kv_tokens, heads, head_size).transpose(1, 2)
    value = v_proj(kv_states).reshape(kv_batch, kv_tokens, heads, head_size).transpose(1, 2)
    scores = torch.matmul(query, key.transpose(2, 3))
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).reshape(batch, q_tokens, width)


def _text_self_attention(self: Any, hidden_states: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    out = _attention(
        hidden_states, hidden_states, self.query, self.key, self.value,
        self.num_attention_heads, self.attention_head_size, attention_mask,
    )  # fmt: skip
    return out, None


def _text_cross_attention(
    self: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None, **kwargs: Any
) -> Any:
    out = _attention(
        hidden_states, encoder_hidden_states, self.query, self.key, self.value,
        self.num_attention_heads, self.attention_head_size, attention_mask,
    )  # fmt: skip
    return out, None


class _PackedSlice:
    """One of Q, K, V out of nn.MultiheadAttention's packed in-projection, as a callable Linear."""

    def __init__(self, attn: Any, index: int) -> None:
        self.attn, self.index = attn, index

    def __call__(self, x: Any) -> Any:
        import torch.nn.functional as F

        width = self.attn.embed_dim
        rows = slice(self.index * width, (self.index + 1) * width)
        return F.linear(x, self.attn.in_proj_weight[rows], self.attn.in_proj_bias[rows])


def _vision_attention(self: Any, hidden_state: Any, attention_mask: Any = None) -> Any:
    attn = self.attn
    q, k, v = (_PackedSlice(attn, i) for i in range(3))
    return attn.out_proj(_attention(hidden_state, hidden_state, q, k, v, attn.num_heads, attn.head_dim, None))


def _vision_forward_pre(self: Any, pixel_values: Any, interpolate_pos_encoding: bool = False) -> Any:
    return self.ln_pre(self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))


def _vision_forward_post(self: Any, hidden_state: Any) -> Any:
    return self.ln_post(hidden_state)


def _finite_mask(config: Any = None, inputs_embeds: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
    """[batch, 1, 1, text_length] additive mask, computed in FP32."""
    mask = attention_mask[:, None, None, :].to(inputs_embeds.dtype if inputs_embeds is not None else None)
    return (1.0 - mask) * MASK_VALUE


@contextmanager
def fusable_export() -> Iterator[None]:
    """Swap in the canonical forms for the duration of an export."""
    with serial_imports():
        from transformers.models.bridgetower import modeling_bridgetower as mb

    with replaced(
        (mb.BridgeTowerSelfAttention, "forward", _text_self_attention),
        (mb.BridgeTowerCrossAttention, "forward", _text_cross_attention),
        (mb.BridgeTowerResidualAttention, "attention", _vision_attention),
        (mb.BridgeTowerVisionTransformer, "forward_pre", _vision_forward_pre),
        (mb.BridgeTowerVisionTransformer, "forward_post", _vision_forward_post),
        (mb, "create_bidirectional_mask", _finite_mask),
    ):
        yield
