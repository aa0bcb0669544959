"""The torch modules that get exported: the whole head, or its text tower, vision tower and fusion.

BridgeTower's towers never see the other modality; only the cross-modal layers do. The text
tower emits, per cross layer, what the cross-modal part reads from text (the transformed
text states plus the text type embedding; the first one layer-normed), the vision tower the
same for images, and the fusion graph runs the cross-modal layers and the head on those.
The maths is transformers' BridgeTowerModel.forward, cut at the tower boundary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from btdeploy.imports import serial_imports
from btdeploy.model.configs import num_image_tokens
from btdeploy.model.heads import HeadSpec
from btdeploy.model.inputs import BATCH, TEXT_LENGTH

PARTS = ("text", "vision", "fusion")
LAYERS = "cross_layers"


@dataclass(frozen=True)
class PartSpec:
    """One split graph: its inputs and outputs with symbolic dims (config -> shape)."""

    name: str
    inputs: tuple[tuple[str, Any], ...]
    outputs: tuple[tuple[str, Any], ...]

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    def dynamic_axes(self, config: Any) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for name, dims in self.inputs + self.outputs:
            axes[name] = {i: d for i, d in enumerate(dims(config)) if isinstance(d, str)}
        return axes


def _cross(config: Any) -> int:
    return int(config.num_hidden_layers)


def _hidden(config: Any) -> int:
    return int(config.hidden_size)


def part_specs(head: HeadSpec) -> dict[str, PartSpec]:
    """The three graphs of a head, read from its declaration."""
    own = head.behaviour.tower_outputs
    out_dims = {spec.name: spec.dims for spec in head.outputs}
    text_states = ("text_states", lambda c: [BATCH, _cross(c), TEXT_LENGTH, _hidden(c)])
    image_states = ("image_states", lambda c: [BATCH, _cross(c), num_image_tokens(c), _hidden(c)])
    inputs = {spec.name: spec.shape for spec in head.inputs}
    assembled = head.behaviour.assembled_outputs
    fused_outputs = [n for n in head.output_names if n not in own["text"] + own["vision"] + assembled]
    return {
        "text": PartSpec(
            "text",
            (("input_ids", inputs["input_ids"]), ("attention_mask", inputs["attention_mask"])),
            (text_states, *((n, out_dims[n]) for n in own["text"])),
        ),
        "vision": PartSpec(
            "vision",
            (("pixel_values", inputs["pixel_values"]),),
            (image_states, *((n, out_dims[n]) for n in own["vision"])),
        ),
        "fusion": PartSpec(
            "fusion",
            (text_states, image_states, ("attention_mask", inputs["attention_mask"])),
            tuple((n, out_dims[n]) for n in fused_outputs),
        ),
    }


def assemble_outputs(head: HeadSpec, values: dict[str, Any]) -> dict[str, Any]:
    """The head's outputs from the parts' outputs."""
    values = head.behaviour.assemble(values)
    return {name: values[name] for name in head.output_names}


def head_module(model: Any, head: HeadSpec) -> Any:
    """Wrap a transformers head so it takes the graph's inputs positionally and returns its outputs as a tuple."""
    return _head_module_class()(model, tuple(head.output_names)).eval()


@functools.cache
def _head_module_class() -> Any:
    """One class for every wrapper (torch is imported on first use): torch.compile guards on the
    module's type, and a class made per call made every new runtime recompile, until dynamo's
    recompile limit silently left later ones eager."""
    import torch

    class HeadModule(torch.nn.Module):
        def __init__(self, model: Any, output_names: tuple[str, ...]) -> None:
            super().__init__()
            self.model = model
            self.output_names = output_names

        def forward(self, input_ids: Any, attention_mask: Any, pixel_values: Any) -> tuple[Any, ...]:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
            return tuple(getattr(outputs, name) for name in self.output_names)

    return HeadModule


def part_modules(model: Any, head: HeadSpec) -> dict[str, Any]:
    """torch modules for the three parts of a loaded transformers head model."""
    import torch
    from torch import nn

    with serial_imports():
        from transformers.models.bridgetower import modeling_bridgetower as mb

    behaviour = head.behaviour
    core = behaviour.core(model)
    config = core.config
    text_layers = core.text_model.encoder.layer
    split = len(text_layers) - int(config.num_hidden_layers) + 1

    def mask_for(states: Any, attention_mask: Any) -> Any:
        # Looked up on the module each call, so the export patches (a finite mask) apply.
        return mb.create_bidirectional_mask(
            config=config, inputs_embeds=states[:, 0:1, :], attention_mask=attention_mask
        )

    class _Part(nn.Module):
        """Holds the head model, so its weights are the part's parameters when it is exported."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

    def type_embedding(index: int, device: Any) -> Any:
        return core.token_type_embeddings(torch.full((1,), index, dtype=torch.long, device=device))

    class TextTower(_Part):
        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, ...]:
            text = core.text_model.embeddings(input_ids=input_ids)
            mask = mask_for(text, attention_mask)
            for layer in text_layers[:split]:
                text = layer(text, mask)
            text_type = type_embedding(0, input_ids.device)
            states = [core.cross_modal_text_layernorm(core._apply_text_transform(text, 0) + text_type)]
            for link, index in enumerate(range(split, len(text_layers)), start=1):
                text = text_layers[index](text, mask)
                states.append(core._apply_text_transform(text, link) + text_type)
            return (torch.stack(states, dim=1), *behaviour.text_tower_outputs(model, text))

    class VisionTower(_Part):
        def forward(self, pixel_values: Any) -> tuple[Any, ...]:
            visual = core.vision_model.visual
            image = visual.forward_pre(pixel_values.type(core.vision_model.dtype))
            for block in visual.transformer.resblocks[:split]:
                image = block(image)
            image_type = type_embedding(1, pixel_values.device)
            first = core._apply_image_transform(visual.forward_post(image), 0) + image_type
            states = [core.cross_modal_image_layernorm(first)]
            for link, index in enumerate(range(split, len(text_layers)), start=1):
                image = visual.transformer.resblocks[index](image)
                states.append(core._apply_image_transform(visual.forward_post(image), link) + image_type)
            last = (visual.forward_post(image), image_type)
            return (torch.stack(states, dim=1), *behaviour.vision_tower_outputs(model, last))

    class Fusion(_Part):
        def forward(self, text_states: Any, image_states: Any, attention_mask: Any) -> tuple[Any, ...]:
            mask = mask_for(text_states[:, 0], attention_mask)
            text_in, image_in = text_states[:, 0], image_states[:, 0]
            text = core.cross_modal_text_layers[0](text_in, image_in, attention_mask=mask)[0]
            image = core.cross_modal_image_layers[0](image_in, text_in, encoder_attention_mask=mask)[0]
            for link in range(1, int(config.num_hidden_layers)):
                text_in = core.cross_modal_text_link_tower[link - 1](text_states[:, link], text, mask)
                image_in = core.cross_modal_image_link_tower[link - 1](image_states[:, link], image, None)
                text = core.cross_modal_text_layers[link](text_in, image_in, attention_mask=mask)[0]
                image = core.cross_modal_image_layers[link](image_in, text_in, encoder_attention_mask=mask)[0]
            return behaviour.fusion_outputs(model, text, image, core.get_cls_features(text, image))

    return {"text": TextTower().eval(), "vision": VisionTower().eval(), "fusion": Fusion().eval()}
