"""`btdeploy run`: preprocess with the checkpoint's processor and print each head's answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.model.media import export_processor, load_image, text_length_problem
from btdeploy.runtime.runtime import Runtime


def refuse_long_texts(processor: Any, texts: list[str], runtime: Runtime) -> None:
    """A text past the model's length is an error, not silently cut (a cut text gets another answer)."""
    problem = text_length_problem(processor.tokenizer, texts, int(runtime.manifest.data["limits"]["max_text_length"]))
    if problem:
        raise BtDeployError(problem)


def score(runtime: Runtime, image_path: Path, texts: list[str]) -> list[tuple[str, str]]:
    """One (text, answer) pair per text."""
    processor = export_processor(runtime.manifest)
    problem = runtime.head.behaviour.text_problem(texts, processor.tokenizer)
    if problem:
        raise BtDeployError(problem)
    image = load_image(image_path, processor.image_processor)
    refuse_long_texts(processor, texts, runtime)
    encoding = processor([image] * len(texts), texts, padding=True, return_tensors="np")
    outputs = runtime(**encoding)
    answers = runtime.head.behaviour.answers(outputs, texts, encoding, processor)
    return list(zip(texts, answers, strict=True))
