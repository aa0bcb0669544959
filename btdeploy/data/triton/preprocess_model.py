"""Triton Python-backend model written by `btdeploy triton-repo`: raw image bytes and text in,
the head's inputs out, preprocessed with the checkpoint's own processor (in ./processor).

It runs inside Triton's container, which needs `pip install transformers pillow`.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def shown(image: Any) -> tuple[Any, str | None]:
    """The image as shown, or why its pixels have no 8-bit reading (upright_rgb and depth_problem
    in btdeploy; this file runs without btdeploy): turned by its EXIF orientation, 16-bit grey
    scaled to 8 bits (PIL's conversion clips it to white), transparency over white, float and wide
    integer pixels refused."""
    from PIL import Image, ImageOps

    upright: Any = ImageOps.exif_transpose(image)  # PIL types its extrema per band layout; read as one band here
    if upright.mode == "F":
        return None, "holds floating-point pixels, which have no fixed scale"
    if upright.mode == "I" and not (0 <= upright.getextrema()[0] and upright.getextrema()[1] <= 255):
        return None, "holds 32-bit pixels past 0..255"
    if upright.mode.startswith("I;16"):
        levels = np.rint(np.asarray(upright, dtype=np.float64) / 257.0)
        upright = Image.fromarray(levels.astype(np.uint8), "L")
    if "A" in upright.getbands() or upright.info.get("transparency") is not None:
        rgba = upright.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"), None
    return upright.convert("RGB"), None


def preprocess(processor: Any, images: Any, texts: Any, limit: int) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and pixel_values for (image bytes, text) pairs; ValueError names a bad one."""
    from PIL import Image

    pictures = []
    for index, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(bytes(data))) as image:
                picture, problem = shown(image)
        except Exception:
            raise ValueError(f"IMAGE {index} is not an image file PIL can read") from None
        if problem:
            raise ValueError(f"IMAGE {index} {problem}: save it with 8 or 16 bits per channel")
        pictures.append(picture)
    captions = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    lengths = [len(ids) for ids in processor.tokenizer(captions)["input_ids"]]
    if max(lengths) > limit:
        raise ValueError(f"TEXT {lengths.index(max(lengths))} is {max(lengths)} tokens, the model takes {limit}")
    try:
        encoding = processor(pictures, captions, padding=True, return_tensors="np")
    except ValueError:
        # The processor resizes an image far longer than it is wide to a side of 0 pixels.
        for index, picture in enumerate(pictures):
            try:
                processor.image_processor([picture], return_tensors="np")
            except ValueError:
                raise ValueError(
                    f"IMAGE {index} is {picture.width}x{picture.height} pixels, too elongated for the checkpoint's "
                    "processor to resize: crop or pad it nearer to square"
                ) from None
        raise
    return {
        "input_ids": np.asarray(encoding["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(encoding["attention_mask"], dtype=np.int64),
        "pixel_values": np.asarray(encoding["pixel_values"], dtype=np.float32),
    }


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from transformers import BridgeTowerProcessor

        here = os.path.dirname(os.path.abspath(__file__))
        self.processor = BridgeTowerProcessor.from_pretrained(os.path.join(here, "processor"))
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.limit = int(parameters["max_text_length"]["string_value"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                if len(images) != len(texts):
                    raise ValueError(f"{len(images)} IMAGE and {len(texts)} TEXT: send one image per text")
                feeds = preprocess(self.processor, images, texts, self.limit)
            except ValueError as error:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error))))
                continue
            tensors = [pb_utils.Tensor(name, value) for name, value in feeds.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
