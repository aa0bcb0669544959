"""`btdeploy run`: preprocess with the checkpoint's processor and print each head's answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    image = load_image(image_path)
    limit = int(runtime.manifest.data["limits"]["max_text_length"])
    encoding = processor(  # type: ignore[operator]
        [image] * len(texts), texts, padding=True, truncation=True, max_length=limit, return_tensors="np"
    )
    outputs = runtime(**encoding)
    head = runtime.head.name
    if head == "itm":
        logits = outputs.logits
        probability = np.exp(logits - logits.max(-1, keepdims=True))
        probability /= probability.sum(-1, keepdims=True)
        return [
            (t, f"match probability {p:.4f} (logit {lg:+.4f})")
            for t, p, lg in zip(texts, probability[:, 1], logits[:, 1], strict=True)
        ]
    if head == "itc":
        similarity = (outputs.text_embeds * outputs.image_embeds).sum(-1)
        return [(t, f"text-image cosine {s:+.4f}") for t, s in zip(texts, similarity, strict=True)]
    if head == "mlm":
        mask_id = processor.tokenizer.mask_token_id  # type: ignore[attr-defined]
        predicted = outputs.logits.argmax(-1)
        answers = []
        for row, text in enumerate(texts):
            ids = encoding["input_ids"][row].copy()
            masked = ids == mask_id
            ids[masked] = predicted[row][masked]
            keep = encoding["attention_mask"][row].astype(bool)
            filled = processor.decode(ids[keep].tolist(), skip_special_tokens=True)  # type: ignore[attr-defined]
            answers.append((text, f"{int(masked.sum())} mask(s) -> {filled!r}"))
        return answers
    pooled = outputs.pooler_output
    return [(t, f"pooler_output norm {np.linalg.norm(p):.4f}") for t, p in zip(texts, pooled, strict=True)]
