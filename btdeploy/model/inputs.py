"""The model inputs, declared once: names, dtypes, symbolic axes, and generated samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from btdeploy.model.configs import max_text_length

BATCH = "batch"
TEXT_LENGTH = "text_length"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # numpy dtype name the graph takes
    axes: tuple[str, ...]  # symbolic names, or "channels"/"height"/"width" fixed by the config

    def shape(self, config: Any) -> list[int | str]:
        size = config.vision_config.image_size
        fixed = {"channels": config.vision_config.num_channels, "height": size, "width": size}
        return [fixed.get(axis, axis) for axis in self.axes]


MODEL_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("input_ids", "int64", (BATCH, TEXT_LENGTH)),
    InputSpec("attention_mask", "int64", (BATCH, TEXT_LENGTH)),
    InputSpec("pixel_values", "float32", (BATCH, "channels", "height", "width")),
)

# The transformers model accepts these and ignores them; so does the runtime.
IGNORED_INPUTS = ("pixel_mask", "token_type_ids")
# The transformers model attends to every token when this is not given; so does the runtime.
ALL_ONES_WHEN_ABSENT = "attention_mask"
# The order of the BridgeTower heads' forward() parameters in transformers: a positional call
# model(input_ids, attention_mask, token_type_ids, pixel_values) maps through it.
FORWARD_ORDER = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "pixel_values",
    "pixel_mask",
    "inputs_embeds",
    "image_embeds",
)
# What transformers' forward() also takes that an exported graph cannot do: each is accepted
# at its default (None or False) and refused otherwise, with the reason and what to do instead.
NOT_EXPORTED = {
    "inputs_embeds": "the graph starts from input_ids; pass token ids, not embeddings",
    "image_embeds": "the graph starts from pixel_values; pass the processor's pixels, not embeddings",
    "labels": "the runtime runs inference and computes no loss; compute it from the outputs",
    "return_loss": "the runtime runs inference and computes no loss; compute it from the outputs",
    "output_hidden_states": "the graph returns the head's outputs only; run the transformers model for hidden states",
    "output_attentions": "the graph returns the head's outputs only; run the transformers model for attentions",
    "interpolate_pos_encoding": "the graph takes images at the checkpoint's size; resize them with its processor",
}
# The token type of the image tokens, which every head's forward() passes on to BridgeTowerModel:
# it reads None and 0 as 1 (`image_token_type_idx or 1`), the type the graphs were exported with,
# and its token type table has no row past 1.
IMAGE_TOKEN_TYPE = ("image_token_type_idx", 1)


def sample_inputs(config: Any, batch: int, text_length: int, seed: int = 0, pad: bool = True) -> dict[str, np.ndarray]:
    """Random but realistic inputs: <s> ... </s> framing and, with `pad`, right padding on some rows.

    Token ids avoid the padding id inside the text, because RoBERTa position ids count
    non-padding tokens (a stray pad id would shift positions, which is the model's
    behaviour but not what a tokenizer produces).
    """
    if not 1 <= text_length <= max_text_length(config):
        raise ValueError(f"text_length must be in 1..{max_text_length(config)}, got {text_length}")
    text = config.text_config
    pad_id = int(text.pad_token_id)
    rng = np.random.default_rng(seed)
    ids = rng.integers(pad_id + 4, text.vocab_size, size=(batch, text_length), dtype=np.int64)
    mask = np.ones((batch, text_length), dtype=np.int64)
    ids[:, 0] = int(text.bos_token_id)
    lengths = np.full(batch, text_length)
    if pad and text_length > 2:
        # Every other row is padded to a different length, at least 2 tokens long.
        for row in range(1, batch, 2):
            lengths[row] = int(rng.integers(2, text_length))
    for row, length in enumerate(lengths):
        if length > 1:
            ids[row, length - 1] = int(text.eos_token_id)
        ids[row, length:] = pad_id
        mask[row, length:] = 0
    size = config.vision_config.image_size
    pixels = rng.standard_normal((batch, config.vision_config.num_channels, size, size)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
