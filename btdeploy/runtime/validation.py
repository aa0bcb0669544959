"""Input checks before anything runs: each failure is one line that says what was expected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from btdeploy.errors import BtDeployError
from btdeploy.model.configs import max_text_length
from btdeploy.model.heads import HeadSpec
from btdeploy.model.inputs import ALL_ONES_WHEN_ABSENT, FORWARD_ORDER, IGNORED_INPUTS, IMAGE_TOKEN_TYPE, NOT_EXPORTED


@dataclass(frozen=True)
class PreparedInputs:
    feeds: dict[str, np.ndarray]  # what the backend gets, in the graph's dtypes
    torch_device: Any | None  # set when the caller passed torch tensors: outputs go back as torch


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if _is_torch_tensor(value):
        tensor = value.detach().cpu()
        # numpy has no bfloat16: widen it (and any other float type numpy lacks) to float32.
        if tensor.is_floating_point() and str(tensor.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn"):
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError:
            raise BtDeployError(
                f"{name} is a ragged list: pad it to one length (processor(..., padding=True))"
            ) from None
    raise BtDeployError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


def call_inputs(head: HeadSpec, args: tuple[Any, ...], keywords: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The inputs of one call as transformers' forward() takes them, and whether it wants a dict
    back: an encoding (processor output) or positional tensors in forward() order, keywords,
    `return_dict`, and the options a graph cannot honour, refused unless left at their default."""
    keywords = dict(keywords)
    return_dict = keywords.pop("return_dict", None)
    if len(args) == 1 and isinstance(args[0], Mapping):
        inputs = {**dict(args[0]), **keywords}
    else:
        if len(args) > len(FORWARD_ORDER):
            raise BtDeployError(
                f"{len(args)} positional inputs, but the {head.name} head takes at most {len(FORWARD_ORDER)} "
                f"({', '.join(FORWARD_ORDER)}): pass them by name"
            )
        inputs = dict(zip(FORWARD_ORDER, args, strict=False))
        _check_image_in_token_type_slot(inputs.get("token_type_ids"))
        twice = sorted(set(inputs) & set(keywords))
        if twice:
            raise BtDeployError(f"{', '.join(twice)} given both by position and by name: pass each once")
        inputs.update(keywords)
    for name, reason in NOT_EXPORTED.items():
        value = inputs.pop(name, None)
        if value is not None and value is not False:
            raise BtDeployError(f"{name} is not supported by an exported head: {reason}")
    _check_image_token_type(inputs.pop(IMAGE_TOKEN_TYPE[0], None))
    return inputs, return_dict is None or bool(return_dict)


def _check_image_in_token_type_slot(value: Any) -> None:
    """model(ids, mask, pixels) puts the images where forward() takes token_type_ids, which the
    head ignores: say so, where it would otherwise answer that pixel_values is missing."""
    if getattr(value, "ndim", None) == 4:
        raise BtDeployError(
            "the third positional input is token_type_ids, as in transformers' forward(input_ids, attention_mask, "
            "token_type_ids, pixel_values, ...), and this one holds images: pass pixel_values by name "
            "(model(input_ids, attention_mask, pixel_values=...)), or None in third place"
        )


def _check_image_token_type(value: Any) -> None:
    name, exported = IMAGE_TOKEN_TYPE
    try:
        given = None if value is None else int(value)
    except (TypeError, ValueError):
        given = -1  # not a number: refused below with the rest
    if given not in (None, 0, exported):
        raise BtDeployError(
            f"{name}={value!r} is not supported: the graph gives image tokens type {exported}, which transformers "
            f"also uses for None and 0, and its token type table has no other; leave it out"
        )


def prepare_inputs(head: HeadSpec, config: Any, inputs: Mapping[str, Any], check_finite: bool = True) -> PreparedInputs:
    expected = head.input_names
    unknown = [name for name in inputs if name not in expected and name not in IGNORED_INPUTS]
    if unknown:
        raise BtDeployError(
            f"unknown input(s) {', '.join(map(repr, unknown))}: the {head.name} head takes "
            f"{', '.join(expected)} ({', '.join(IGNORED_INPUTS)} accepted and ignored)"
        )
    missing = [name for name in expected if inputs.get(name) is None and name != ALL_ONES_WHEN_ABSENT]
    if missing:
        raise BtDeployError(
            f"missing input(s) {', '.join(missing)}: the {head.name} head needs {', '.join(expected)} "
            "(pass processor(images, texts, return_tensors='pt') as **encoding)"
        )
    device = next((v.device for v in inputs.values() if _is_torch_tensor(v)), None)
    arrays = {name: inputs.get(name) for name in expected}
    ids, mask = check_text(config, arrays["input_ids"], arrays["attention_mask"], head)
    pixels = check_pixels(config, arrays["pixel_values"], check_finite)
    if ids.shape[0] != pixels.shape[0]:
        raise BtDeployError(
            f"batch sizes disagree: {ids.shape[0]} text(s) in input_ids but {pixels.shape[0]} image(s) "
            "in pixel_values; pass one image per text"
        )
    return PreparedInputs(feeds={"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, torch_device=device)


def check_text(config: Any, ids: Any, mask: Any | None, head: HeadSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask as the text tower takes them (int64), or one line saying what is
    wrong. No mask (None) attends to every token, as transformers' BridgeTowerModel does. For a
    `head` that reads each text's first token, a row padded on the left is refused."""
    ids = _to_numpy("input_ids", ids)
    if ids.dtype.kind in "USO":  # texts, not token ids
        raise BtDeployError(
            "input_ids holds text, not token ids: tokenize it first, "
            "e.g. processor(images, texts, return_tensors='pt') or processor.tokenizer(texts, padding=True)"
        )
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise BtDeployError(f"input_ids must be a 2-D integer array [batch, text_length], got {_describe(ids)}")
    mask = np.ones(ids.shape, dtype=np.int64) if mask is None else _to_numpy("attention_mask", mask)
    # transformers takes a float mask of 0.0 and 1.0 too (it builds the additive mask from it).
    float_mask = np.issubdtype(mask.dtype, np.floating)
    if mask.shape != ids.shape or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_ or float_mask):
        raise BtDeployError(
            f"attention_mask must be an integer, bool or 0/1 float array shaped like input_ids {list(ids.shape)}, "
            f"got {_describe(mask)}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise BtDeployError(f"input_ids is empty ({list(ids.shape)}): pass at least one text of at least one token")
    limit = max_text_length(config)
    if ids.shape[1] > limit:
        raise BtDeployError(
            f"text of {ids.shape[1]} tokens is longer than the model's {limit} positions: "
            f"truncate it (processor(..., truncation=True, max_length={limit}))"
        )
    vocab = int(config.text_config.vocab_size)
    if ids.min() < 0 or ids.max() >= vocab:
        raise BtDeployError(
            f"input_ids has ids outside the vocabulary 0..{vocab - 1} (min {ids.min()}, max {ids.max()})"
        )
    if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
        raise BtDeployError("attention_mask must hold only 0 and 1")
    empty_rows = np.flatnonzero(~mask.astype(bool).any(axis=1))
    if empty_rows.size:
        # A row with no token to attend to has no defined answer: the reference softmaxes a row of
        # equal masked scores, the fused operators do not, and the results differ silently.
        raise BtDeployError(
            f"attention_mask row(s) {', '.join(map(str, empty_rows[:8]))} are all zeros: every text needs at least "
            "one token (the tokenizer's <s> is always unmasked); drop those rows"
        )
    left_padded = np.flatnonzero(~mask[:, 0].astype(bool))
    if head is not None and head.behaviour.reads_first_token and left_padded.size:
        # transformers answers these rows from the pad's state, silently; no graph can do better.
        raise BtDeployError(
            f"attention_mask row(s) {', '.join(map(str, left_padded[:8]))} start with padding: the {head.name} head "
            "reads each text's first token, which is a pad there; pad on the right "
            "(processor.tokenizer.padding_side = 'right')"
        )
    return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(mask, dtype=np.int64)


def check_pixels(config: Any, pixels: Any, check_finite: bool = True) -> np.ndarray:
    """pixel_values as the vision tower takes them (float32), or one line saying what is wrong."""
    pixels = _to_numpy("pixel_values", pixels)
    size, channels = int(config.vision_config.image_size), int(config.vision_config.num_channels)
    if pixels.ndim != 4 or not np.issubdtype(pixels.dtype, np.floating):
        raise BtDeployError(
            f"pixel_values must be a 4-D float array [batch, {channels}, {size}, {size}], got {_describe(pixels)}"
        )
    if tuple(pixels.shape[1:]) != (channels, size, size):
        raise BtDeployError(
            f"pixel_values has images of {list(pixels.shape[1:])}, the model takes [{channels}, {size}, {size}]: "
            "use this checkpoint's processor (it resizes and center-crops to the model's image size)"
        )
    if pixels.shape[0] == 0:
        raise BtDeployError("pixel_values is empty: pass at least one image")
    if check_finite and not np.isfinite(pixels).all():
        bad = np.flatnonzero(~np.isfinite(pixels).reshape(pixels.shape[0], -1).all(axis=1))
        raise BtDeployError(
            f"pixel_values of image(s) {', '.join(map(str, bad[:8]))} hold NaN or Inf, which would propagate into "
            "every output: fix the preprocessing, or load with check_finite=False to pass them through"
        )
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _describe(array: np.ndarray) -> str:
    return f"{array.ndim}-D {array.dtype} {list(array.shape)}"
