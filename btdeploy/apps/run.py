"""`btdeploy run`: preprocess with the checkpoint's processor and print each head's answer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btdeploy.artifacts.manifest import Manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS
from btdeploy.model.masked_words import top_k_problem
from btdeploy.model.media import export_processor, load_image, text_length_problem
from btdeploy.runtime.runtime import Runtime


def refuse_long_texts(processor: Any, texts: list[str], manifest: Manifest) -> None:
    """A text past the model's length is an error, not silently cut (a cut text gets another answer)."""
    problem = text_length_problem(processor.tokenizer, texts, int(manifest.data["limits"]["max_text_length"]))
    if problem:
        raise BtDeployError(problem)


@dataclass(frozen=True)
class RunRequest:
    """What `btdeploy run` scores, every part of it checked: the export's processor, the image
    decoded, the texts, and how many candidates to list for each <mask>."""

    processor: Any
    image: Any
    texts: list[str]
    top_k: int


def run_request(manifest: Manifest, image_path: Path, texts: list[str], top_k: int = 1) -> RunRequest:
    """The request refused or read from the head's manifest alone, before its model loads: a wrong
    text or an unreadable image had been said after seconds of loading."""
    behaviour = HEADS[manifest.head].behaviour
    if top_k != 1 and not behaviour.takes_top_k:
        takers = ", ".join(name for name, head in HEADS.items() if head.behaviour.takes_top_k)
        raise BtDeployError(
            f"--top-k lists the {takers} head's candidates for each <mask>; the {manifest.head} head has one "
            "answer per text: leave --top-k out"
        )
    problem = top_k_problem(top_k)
    if problem:
        raise BtDeployError(f"--top-k: {problem}")
    processor = export_processor(manifest)
    problem = behaviour.text_problem(texts, processor.tokenizer)
    if problem:
        raise BtDeployError(problem)
    image = load_image(image_path, processor.image_processor)
    refuse_long_texts(processor, texts, manifest)
    return RunRequest(processor, image, texts, top_k)


def score(runtime: Runtime, request: RunRequest) -> list[dict[str, Any]]:
    """Each text's answer, as the head gives it (`answers`: the values the server's task routes
    return); `top_k` candidates in each where the head ranks some (mlm)."""
    texts = request.texts
    encoding = request.processor([request.image] * len(texts), texts, padding=True, return_tensors="np")
    outputs = runtime(**encoding)
    return runtime.head.behaviour.answers(outputs, texts, encoding, request.processor, request.top_k)
