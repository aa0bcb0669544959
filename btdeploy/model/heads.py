"""Each head described once: class, outputs, axes, export shape and tolerances. Everything else reads this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.model.configs import num_image_tokens
from btdeploy.model.inputs import BATCH, MODEL_INPUTS, TEXT_LENGTH, InputSpec


@dataclass(frozen=True)
class Tolerance:
    """A parity bound for one output at one precision.

    FP32 is held to an absolute bound. Reduced precisions round every activation (FP16) or
    every matmul operand (INT8) to a step that scales with the values, so their error bound
    is a fraction of the output's range (max |reference| of the batch) instead; it is reported
    and it decides which argmax positions are clear, while their pass/fail gate is the cosine
    and argmax floors (a 2-logit ITM head with small logits can be off by a large fraction of
    its range and still rank every pair alike).
    """

    max_abs: float  # absolute bound, or a fraction of the range when `of_range`
    min_cosine: float
    min_argmax_agreement: float = 1.0  # fraction of positions whose top-2 margin is clear
    of_range: bool = False

    def bound(self, reference_range: float) -> float:
        """The absolute error bound for a reference whose largest magnitude is reference_range."""
        return self.max_abs * reference_range if self.of_range else self.max_abs

    def argmax_margin(self, reference_range: float) -> float:
        """A position counts for argmax agreement only when the reference's top-2 margin exceeds this.

        Two outputs within the error bound of the reference can swap a top-2 pair whose margin
        is at most twice the bound, so only clearer margins can be held to agreement.
        """
        return 2.0 * self.bound(reference_range)

    def describe(self) -> str:
        limit = f"bound {self.max_abs:g} of range" if self.of_range else f"abs<={self.max_abs:g}"
        text = f"{limit} cos>={self.min_cosine:g}"
        return text + (f" argmax>={100 * self.min_argmax_agreement:g}%" if self.min_argmax_agreement < 1 else "")


FP32 = Tolerance(max_abs=1e-4, min_cosine=0.99999, min_argmax_agreement=1.0)
# FP16 keeps 11 significant bits (relative step 4.9e-4 per rounding); some tens of layers
# of roundings stay within 2 % of the output's range. The floor is cosine 0.999.
FP16 = Tolerance(max_abs=2e-2, min_cosine=0.999, min_argmax_agreement=1.0, of_range=True)
# INT8 steps are 1/127 of each quantized tensor's range; the floors are cosine 0.99 and 99 %
# argmax agreement on the positions clear of twice the bound.
INT8 = Tolerance(max_abs=1e-1, min_cosine=0.99, min_argmax_agreement=0.99, of_range=True)
PRECISION_TOLERANCES = {"fp32": FP32, "fp16": FP16, "int8": INT8, "int8-dynamic": INT8}
PRECISIONS = ("fp16", "int8", "int8-dynamic")  # what `btdeploy quantize` makes


@dataclass(frozen=True)
class OutputSpec:
    name: str
    dims: Callable[[Any], list[int | str]]  # config -> shape with symbolic axis names
    is_logits: bool = False  # argmax over the last axis is meaningful
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(PRECISION_TOLERANCES))


@dataclass(frozen=True)
class HeadSpec:
    name: str
    model_class: str  # transformers class name
    description: str
    outputs: tuple[OutputSpec, ...]
    # Parameter-name prefixes that belong to this head alone; a checkpoint without them
    # gets them randomly initialised (with a loud warning).
    head_weight_prefixes: tuple[str, ...]
    inputs: tuple[InputSpec, ...] = MODEL_INPUTS
    export_batch: int = 2
    export_text_length: int = 16
    # TensorRT optimization profile (min, opt, max); the image size is fixed by the config.
    engine_batch: tuple[int, int, int] = (1, 8, 32)
    engine_text_length: tuple[int, int, int] = (1, 40, 512)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def output(self, name: str) -> OutputSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def dynamic_axes(self, config: Any) -> dict[str, dict[int, str]]:
        """torch.onnx dynamic_axes for every input and output, from the symbolic dims."""
        axes: dict[str, dict[int, str]] = {}
        shapes = [(s.name, s.shape(config)) for s in self.inputs] + [(s.name, s.dims(config)) for s in self.outputs]
        for name, shape in shapes:
            axes[name] = {index: dim for index, dim in enumerate(shape) if isinstance(dim, str)}
        return axes

    def model_class_object(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)


def _hidden(config: Any) -> int:
    return int(config.hidden_size)


def _vocab(config: Any) -> int:
    return int(config.text_config.vocab_size)


def _contrastive(config: Any) -> int:
    return int(config.contrastive_hidden_size)


HEADS: dict[str, HeadSpec] = {
    "base": HeadSpec(
        name="base",
        model_class="BridgeTowerModel",
        description="cross-modal features and pooled [text CLS; image CLS]",
        outputs=(
            OutputSpec("text_features", lambda c: [BATCH, TEXT_LENGTH, _hidden(c)]),
            OutputSpec("image_features", lambda c: [BATCH, num_image_tokens(c), _hidden(c)]),
            OutputSpec("pooler_output", lambda c: [BATCH, 2 * _hidden(c)]),
        ),
        head_weight_prefixes=(),
    ),
    "itm": HeadSpec(
        name="itm",
        model_class="BridgeTowerForImageAndTextRetrieval",
        description="image-text matching logits (index 1 = match)",
        outputs=(OutputSpec("logits", lambda c: [BATCH, 2], is_logits=True),),
        head_weight_prefixes=("itm_score.",),
    ),
    "itc": HeadSpec(
        name="itc",
        model_class="BridgeTowerForContrastiveLearning",
        description="L2-normalised text, image and cross embeddings",
        outputs=(
            OutputSpec("text_embeds", lambda c: [BATCH, _contrastive(c)]),
            OutputSpec("image_embeds", lambda c: [BATCH, _contrastive(c)]),
            OutputSpec("cross_embeds", lambda c: [BATCH, _contrastive(c)]),
            OutputSpec("logits", lambda c: [BATCH, 3, _contrastive(c)]),
        ),
        head_weight_prefixes=("itc_text_head.", "itc_image_head.", "itc_cross_modal_head.", "logit_scale"),
    ),
    "mlm": HeadSpec(
        name="mlm",
        model_class="BridgeTowerForMaskedLM",
        description="masked-word logits over the vocabulary",
        outputs=(OutputSpec("logits", lambda c: [BATCH, TEXT_LENGTH, _vocab(c)], is_logits=True),),
        head_weight_prefixes=("mlm_score.",),
    ),
}


def get_head(name: str) -> HeadSpec:
    if name not in HEADS:
        raise BtDeployError(f"unknown head {name!r}: choose from {', '.join(HEADS)}")
    return HEADS[name]


def parse_heads(text: str) -> list[str]:
    """'all' or a comma list of head names, validated, in declaration order."""
    if text.strip() == "all":
        return list(HEADS)
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise BtDeployError("--heads is empty: give 'all' or a comma list such as itm,mlm")
    for name in names:
        get_head(name)
    return [name for name in HEADS if name in names]
