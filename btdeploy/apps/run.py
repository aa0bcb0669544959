"""`btdeploy run`: preprocess with the checkpoint's processor and print each head's answer."""

from __future__ import annotations

from pathlib import Path

from btdeploy.errors import BtDeployError
from btdeploy.model.media import load_image
from btdeploy.runtime.runtime import Runtime


def load_processor(runtime: Runtime) -> object:
    from transformers import BridgeTowerProcessor

    folder = runtime.manifest.processor_dir
    if not folder.is_dir():
        raise BtDeployError(
            f"{runtime.manifest.folder} has no processor/ folder: export from a checkpoint that has one"
        )
    return BridgeTowerProcessor.from_pretrained(folder)


def score(runtime: Runtime, image_path: Path, texts: list[str]) -> list[tuple[str, str]]:
    """One (text, answer) pair per text."""
    processor = load_processor(runtime)
    image = load_image(image_path, processor.image_processor)  # type: ignore[attr-defined]
    limit = int(runtime.manifest.data["limits"]["max_text_length"])
    encoding = processor(  # type: ignore[operator]
        [image] * len(texts), texts, padding=True, truncation=True, max_length=limit, return_tensors="np"
    )
    outputs = runtime(**encoding)
    answers = runtime.head.behaviour.answers(outputs, texts, encoding, processor)
    return list(zip(texts, answers, strict=True))
