"""`btdeploy run`: preprocess with the checkpoint's processor and print each head's answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.model.media import load_image, text_length_problem
from btdeploy.runtime.runtime import Runtime


def load_processor(runtime: Runtime) -> object:
    from transformers import BridgeTowerProcessor

    folder = runtime.manifest.processor_dir
    if not folder.is_dir():
        raise BtDeployError(
            f"{runtime.manifest.folder} has no processor/ folder: export from a checkpoint that has one"
        )
    return BridgeTowerProcessor.from_pretrained(folder)


def refuse_long_texts(processor: Any, texts: list[str], runtime: Runtime) -> None:
    """A text past the model's length is an error, not silently cut (a cut text gets another answer)."""
    problem = text_length_problem(processor.tokenizer, texts, int(runtime.manifest.data["limits"]["max_text_length"]))
    if problem:
        raise BtDeployError(problem)


def score(runtime: Runtime, image_path: Path, texts: list[str]) -> list[tuple[str, str]]:
    """One (text, answer) pair per text."""
    processor = load_processor(runtime)
    image = load_image(image_path, processor.image_processor)  # type: ignore[attr-defined]
    refuse_long_texts(processor, texts, runtime)
    encoding = processor([image] * len(texts), texts, padding=True, return_tensors="np")  # type: ignore[operator]
    outputs = runtime(**encoding)
    answers = runtime.head.behaviour.answers(outputs, texts, encoding, processor)
    return list(zip(texts, answers, strict=True))
