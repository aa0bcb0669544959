"""Each head described once: class, outputs, axes, export shape, tolerances and behaviour.

Everything else reads this; no module outside it branches on a head's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from btdeploy.artifacts.graph_names import Precision
from btdeploy.errors import BtDeployError
from btdeploy.imports import serial_imports
from btdeploy.model.configs import CONTRASTIVE_DEFAULTS, num_image_tokens
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
        """The floors a row is held to; a reduced precision's bound is named as the margin it sets, not a floor.

        Written "bound 0.1 of range", a row off by 0.104 of range read as a failure marked PASS.
        """
        if self.of_range:
            return (
                f"cos>={self.min_cosine:g} argmax>={100 * self.min_argmax_agreement:g}% "
                f"margin>{self.argmax_margin(1.0):g} of range"  # the argmax margin, per unit of range
            )
        text = f"abs<={self.max_abs:g} cos>={self.min_cosine:g}"
        return text + (f" argmax>={100 * self.min_argmax_agreement:g}%" if self.min_argmax_agreement < 1 else "")


FP32 = Tolerance(max_abs=1e-4, min_cosine=0.99999, min_argmax_agreement=1.0)
# FP16 keeps 11 significant bits (relative step 4.9e-4 per rounding); some tens of layers
# of roundings stay within 2 % of the output's range. The floor is cosine 0.999.
FP16 = Tolerance(max_abs=2e-2, min_cosine=0.999, min_argmax_agreement=1.0, of_range=True)
# BF16 keeps 8 significant bits (relative step 3.9e-3 per rounding, 8x FP16's), so its bound is
# wider and its cosine floor lower than FP16's. Measured worst with torch's CPU bf16 kernels on
# base itm: 3.7e-2 of range, cosine 0.99980; on tiny, every head: 2.0e-2, 0.99994.
BF16 = Tolerance(max_abs=1e-1, min_cosine=0.995, min_argmax_agreement=1.0, of_range=True)
# INT8 steps are 1/127 of each quantized tensor's range; the floors are cosine 0.99 and 99 %
# argmax agreement on the positions clear of twice the bound.
INT8 = Tolerance(max_abs=1e-1, min_cosine=0.99, min_argmax_agreement=0.99, of_range=True)
PRECISION_TOLERANCES = {
    Precision.FP32: FP32,
    Precision.FP16: FP16,
    Precision.BF16: BF16,  # the PyTorch reference and OpenVINO, on the FP32 graphs
    Precision.INT8: INT8,
    Precision.INT8_DYNAMIC: INT8,
}


@dataclass(frozen=True)
class OutputSpec:
    name: str
    dims: Callable[[Any], list[int | str]]  # config -> shape with symbolic axis names
    is_logits: bool = False  # argmax over the last axis is meaningful
    tolerances: dict[Precision, Tolerance] = field(default_factory=lambda: dict(PRECISION_TOLERANCES))


RANKINGS = (  # a retrieval head's two directions, held to each other as logits are
    OutputSpec("text_to_image", lambda c: ["captions", "images"], is_logits=True),
    OutputSpec("image_to_text", lambda c: ["images", "captions"], is_logits=True),
)


@dataclass(frozen=True)
class EmbeddingRetrieval:
    """A head that embeds texts and images apart (its `text` and `image` outputs): over the user's
    image-caption pairs, `check` ranks every image for each caption and every caption for each image
    by the cosine of their embeddings, on the reference and on the graph, and holds the two score
    matrices to each other as logits (the top-1 of every query whose reference margin is clear)."""

    text: str
    image: str
    score: str = "cosine"
    every_pair: bool = False  # a caption's embedding does not depend on the image beside it
    outputs: tuple[OutputSpec, ...] = RANKINGS


@dataclass(frozen=True)
class MatchRetrieval:
    """A head that scores each pair as it is given (its `logits` output, column 1 = match): the same
    ranking from the log-odds of matching, logit 1 - logit 0 (the order of the match probability
    `rank` sorts by, without the softmax's saturation), which needs every caption run with every
    image (`check --all-pairs`)."""

    logits: str
    score: str = "match log-odds"
    every_pair: bool = True
    outputs: tuple[OutputSpec, ...] = RANKINGS


RetrievalSpec = EmbeddingRetrieval | MatchRetrieval


def _linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


class HeadBehaviour:
    """What a head does beyond the shared BridgeTowerModel: its torch code paths for the split
    towers, how its answer is printed, its FLOPs and config rules. One subclass per head."""

    # Head outputs a tower computes on its own, without the other modality.
    tower_outputs: dict[str, tuple[str, ...]] = {"text": (), "vision": ()}
    # Outputs assembled at run time from the others (never an output of a split graph).
    assembled_outputs: tuple[str, ...] = ()
    # Attention blocks the exporters prune because no output depends on them.
    dead_attention_blocks: int = 0
    # Every output is read off each text's first token ([CLS], through the pooler or a projection):
    # a text padded on the left has a pad there, and the answer is another text's.
    reads_first_token: bool = False
    # Its answer has candidates to rank (the masked-LM head's tokens per <mask>): `run --top-k`, /v1/<task>?top_k=.
    takes_top_k: bool = False

    def core(self, model: Any) -> Any:
        """The BridgeTowerModel inside the head model."""
        return model.bridgetower

    def text_tower_outputs(self, model: Any, text: Any) -> tuple[Any, ...]:
        """Extra text-tower outputs from the last text layer's states."""
        return ()

    def vision_tower_outputs(self, model: Any, image: Any) -> tuple[Any, ...]:
        """Extra vision-tower outputs; `image` is (the last vision layer after ln_post, the image type embedding)."""
        return ()

    def fusion_outputs(self, model: Any, text: Any, image: Any, pooled: Any) -> tuple[Any, ...]:
        """The head's outputs from the last cross-modal states and the pooled [text CLS; image CLS]."""
        raise NotImplementedError

    def assemble(self, values: dict[str, Any]) -> dict[str, Any]:
        return values

    def answers(
        self, outputs: Any, texts: list[str], encoding: Any, processor: Any, top_k: int = 1
    ) -> list[dict[str, Any]]:
        """Each text's answer in JSON values, from the head's outputs (a HeadOutput or a dict of
        arrays) and the encoding they ran on: what the server's /v1/<head> returns and `btdeploy run`
        prints (`answer_line`); `top_k` candidates where the head ranks some (`takes_top_k`)."""
        raise NotImplementedError

    def answer_line(self, answer: dict[str, Any]) -> str:
        """One answer as `btdeploy run` prints it after its text."""
        raise NotImplementedError

    def text_problem(self, texts: list[str], tokenizer: Any) -> str | None:
        """Why this head cannot answer for these texts (`run`, and the server's task routes), or None."""
        empty = [str(i + 1) for i, text in enumerate(texts) if not text.strip()]
        if empty:
            return f"text {', '.join(empty)} of {len(texts)} is empty: every text needs words"
        return None

    def extra_flops(self, config: Any, batch: int, text_tokens: int, image_tokens: int) -> int:
        """FLOPs of the head on top of the shared model, for the whole batch."""
        return 0

    def check_config(self, config: Any) -> None:
        """Refuse a config this head cannot run, with the reason and the fix."""


class BaseBehaviour(HeadBehaviour):
    def core(self, model: Any) -> Any:
        return model

    def fusion_outputs(self, model: Any, text: Any, image: Any, pooled: Any) -> tuple[Any, ...]:
        return text, image, pooled

    def answers(
        self, outputs: Any, texts: list[str], encoding: Any, processor: Any, top_k: int = 1
    ) -> list[dict[str, Any]]:
        import numpy as np

        norms = np.linalg.norm(outputs["pooler_output"], axis=-1)
        return [{"text": text, "pooler_output_norm": float(n)} for text, n in zip(texts, norms, strict=True)]

    def answer_line(self, answer: dict[str, Any]) -> str:
        return f"pooler_output norm {answer['pooler_output_norm']:.4f}"


def match_probability(logits: Any) -> Any:
    """The ITM head's match probability: softmax of its 2 logits, index 1 (numpy, any leading axes)."""
    import numpy as np

    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted[..., 1] / shifted.sum(-1)


def text_image_cosine(text_embeds: Any, image_embeds: Any) -> Any:
    """The ITC head's text-image cosine of each pair: its embeddings are unit vectors (numpy)."""
    return (text_embeds * image_embeds).sum(-1)


class ItmBehaviour(HeadBehaviour):
    reads_first_token = True

    def fusion_outputs(self, model: Any, text: Any, image: Any, pooled: Any) -> tuple[Any, ...]:
        return (model.itm_score(pooled),)

    def answers(
        self, outputs: Any, texts: list[str], encoding: Any, processor: Any, top_k: int = 1
    ) -> list[dict[str, Any]]:
        logits = outputs["logits"]
        rows = zip(texts, match_probability(logits), logits[:, 1], strict=True)
        return [{"text": text, "match_probability": float(p), "logit": float(lg)} for text, p, lg in rows]

    def answer_line(self, answer: dict[str, Any]) -> str:
        return f"match probability {answer['match_probability']:.4f} (logit {answer['logit']:+.4f})"

    def extra_flops(self, config: Any, batch: int, text_tokens: int, image_tokens: int) -> int:
        return batch * _linear_flops(1, 2 * int(config.hidden_size), 2)


class ItcBehaviour(HeadBehaviour):
    reads_first_token = True
    tower_outputs = {"text": ("text_embeds",), "vision": ("image_embeds",)}
    assembled_outputs = ("logits",)  # stacks the three embeddings

    def text_tower_outputs(self, model: Any, text: Any) -> tuple[Any, ...]:
        from torch import nn

        return (nn.functional.normalize(model.itc_text_head(text[:, 0, :]), dim=-1, p=2),)

    def vision_tower_outputs(self, model: Any, image: Any) -> tuple[Any, ...]:
        from torch import nn

        embedded = model.bridgetower.cross_modal_image_transform(image[0]) + image[1]
        return (nn.functional.normalize(model.itc_image_head(embedded[:, 0, :]), dim=-1, p=2),)

    def fusion_outputs(self, model: Any, text: Any, image: Any, pooled: Any) -> tuple[Any, ...]:
        from torch import nn

        return (nn.functional.normalize(model.itc_cross_modal_head(pooled), dim=-1, p=2),)

    def assemble(self, values: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        if "logits" in values:
            return values
        stacked = np.stack([values["text_embeds"], values["image_embeds"], values["cross_embeds"]], 1)
        return {**values, "logits": stacked}

    def answers(
        self, outputs: Any, texts: list[str], encoding: Any, processor: Any, top_k: int = 1
    ) -> list[dict[str, Any]]:
        cosine = text_image_cosine(outputs["text_embeds"], outputs["image_embeds"])
        return [{"text": text, "cosine": float(c)} for text, c in zip(texts, cosine, strict=True)]

    def answer_line(self, answer: dict[str, Any]) -> str:
        return f"text-image cosine {answer['cosine']:+.4f}"

    def extra_flops(self, config: Any, batch: int, text_tokens: int, image_tokens: int) -> int:
        hidden, embed = int(config.hidden_size), int(config.contrastive_hidden_size)
        # The image embedding re-runs the image transform on the last vision layer's output.
        per_row = _linear_flops(image_tokens, int(config.vision_config.hidden_size), hidden)
        per_row += 2 * _linear_flops(1, hidden, embed) + _linear_flops(1, 2 * hidden, embed)
        # The head also computes three batch x batch similarity matrices (unused by inference).
        return batch * per_row + 3 * _linear_flops(batch, embed, batch)

    def check_config(self, config: Any) -> None:
        if config.vision_config.hidden_size != config.hidden_size:
            raise BtDeployError(
                f"the itc head adds a text-sized token-type embedding to the vision features, so it needs "
                f"vision hidden_size ({config.vision_config.hidden_size}) == hidden_size ({config.hidden_size}); "
                "export the other heads with --heads base,itm,mlm"
            )
        for key, default in CONTRASTIVE_DEFAULTS.items():
            if getattr(config, key, None) is None:
                raise BtDeployError(
                    f"the itc head needs {key} in the config (released checkpoints use {default}): "
                    "add it to config.json"
                )


class MlmBehaviour(HeadBehaviour):
    # It reads only text features, so the last image-side cross layer (self + cross attention) is dead.
    dead_attention_blocks = 2
    takes_top_k = True

    def fusion_outputs(self, model: Any, text: Any, image: Any, pooled: Any) -> tuple[Any, ...]:
        return (model.mlm_score(text),)

    def text_problem(self, texts: list[str], tokenizer: Any) -> str | None:
        token = tokenizer.mask_token
        unmasked = [str(i + 1) for i, text in enumerate(texts) if token not in text]
        if unmasked:
            return (
                f"text {', '.join(unmasked)} of {len(texts)} has no {token}: "
                f"every text needs at least one {token} where a word is missing"
            )
        return super().text_problem(texts, tokenizer)

    def answers(
        self, outputs: Any, texts: list[str], encoding: Any, processor: Any, top_k: int = 1
    ) -> list[dict[str, Any]]:
        from dataclasses import asdict

        from btdeploy.model.masked_words import fill_masks

        filled = fill_masks(
            outputs["logits"], encoding["input_ids"], encoding["attention_mask"], processor.tokenizer, top_k
        )
        return [
            {
                "text": text,
                "filled": answer.filled,
                "predicted_tokens": answer.predicted_tokens,
                "candidates": [[asdict(candidate) for candidate in per_mask] for per_mask in answer.candidates],
            }
            for text, answer in zip(texts, filled, strict=True)
        ]

    def answer_line(self, answer: dict[str, Any]) -> str:
        line = f"{len(answer['candidates'])} mask(s) -> {answer['filled']!r}"
        if any(len(per_mask) > 1 for per_mask in answer["candidates"]):  # asked for with --top-k
            for index, per_mask in enumerate(answer["candidates"], 1):
                line += f"; mask {index}: " + ", ".join(f"{c['token']!r} {c['probability']:.3f}" for c in per_mask)
        return line

    def extra_flops(self, config: Any, batch: int, text_tokens: int, image_tokens: int) -> int:
        hidden = int(config.hidden_size)
        transform = _linear_flops(text_tokens, hidden, hidden)
        return batch * (transform + _linear_flops(text_tokens, hidden, int(config.text_config.vocab_size)))


@dataclass(frozen=True)
class HeadSpec:
    name: str
    model_class: str  # transformers class name
    description: str
    outputs: tuple[OutputSpec, ...]
    # Parameter-name prefixes that belong to this head alone; a checkpoint without them
    # gets them randomly initialised (with a loud warning).
    head_weight_prefixes: tuple[str, ...]
    behaviour: HeadBehaviour
    inputs: tuple[InputSpec, ...] = MODEL_INPUTS
    export_batch: int = 2
    export_text_length: int = 16
    # TensorRT optimization profile (min, opt, max); the image size is fixed by the config.
    engine_batch: tuple[int, int, int] = (1, 8, 32)
    engine_text_length: tuple[int, int, int] = (1, 40, 512)
    retrieval: RetrievalSpec | None = None  # ranked over real pairs (`check --images --texts`)

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
        with serial_imports():
            import transformers

        return getattr(transformers, self.model_class)

    def attention_blocks(self, config: Any) -> int:
        """Every attention block the head's outputs depend on: text tower and vision tower (which
        run in step, so vision layers past the text layer count are never used) and, per cross
        layer, self + cross attention in both stacks, less the blocks no output reads."""
        layers = int(config.text_config.num_hidden_layers)
        return 2 * layers + 4 * int(config.num_hidden_layers) - self.behaviour.dead_attention_blocks

    def bridges(self, config: Any) -> int:
        """One link tower per modality between consecutive cross layers."""
        return 2 * (int(config.num_hidden_layers) - 1)

    def check_config(self, config: Any) -> None:
        self.behaviour.check_config(config)


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
        behaviour=BaseBehaviour(),
    ),
    "itm": HeadSpec(
        name="itm",
        model_class="BridgeTowerForImageAndTextRetrieval",
        description="image-text matching logits (index 1 = match)",
        outputs=(OutputSpec("logits", lambda c: [BATCH, 2], is_logits=True),),
        head_weight_prefixes=("itm_score.",),
        behaviour=ItmBehaviour(),
        retrieval=MatchRetrieval("logits"),
    ),
    "itc": HeadSpec(
        name="itc",
        model_class="BridgeTowerForContrastiveLearning",
        description="L2-normalised text, image and cross embeddings",
        outputs=(  # transformers' order (BridgeTowerContrastiveOutput), so out[0] and to_tuple() agree
            OutputSpec("logits", lambda c: [BATCH, 3, _contrastive(c)]),
            OutputSpec("text_embeds", lambda c: [BATCH, _contrastive(c)]),
            OutputSpec("image_embeds", lambda c: [BATCH, _contrastive(c)]),
            OutputSpec("cross_embeds", lambda c: [BATCH, _contrastive(c)]),
        ),
        head_weight_prefixes=("itc_text_head.", "itc_image_head.", "itc_cross_modal_head.", "logit_scale"),
        behaviour=ItcBehaviour(),
        retrieval=EmbeddingRetrieval("text_embeds", "image_embeds"),
    ),
    "mlm": HeadSpec(
        name="mlm",
        model_class="BridgeTowerForMaskedLM",
        description="masked-word logits over the vocabulary",
        outputs=(OutputSpec("logits", lambda c: [BATCH, TEXT_LENGTH, _vocab(c)], is_logits=True),),
        head_weight_prefixes=("mlm_score.",),
        behaviour=MlmBehaviour(),
    ),
}
# The heads that carry weights of their own: what a preset checkpoint holds.
CHECKPOINT_HEADS = tuple(name for name, spec in HEADS.items() if spec.head_weight_prefixes)


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
