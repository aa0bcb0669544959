"""Task endpoints a person calls with curl: raw inputs in, the answer out.

A task request is JSON (`{"image": base64, "texts": [...]}`, or `"images"` and `"text"` for
ranking) or the raw image bytes as the body with the captions as `?text=` query parameters.
Preprocessing uses the checkpoint's own processor, as `btdeploy run` does; answers are numbers
in JSON. Each task is declared once in TASKS: the head it runs; its answer is the head's own
(`answers` in model/heads.py), which `btdeploy run --json` prints too.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from btdeploy.model.heads import get_head
from btdeploy.model.masked_words import top_k_problem
from btdeploy.model.media import depth_problem, resize_problem, text_length_problem, upright_rgb, upright_size
from btdeploy.serve.protocol import RequestError

MAX_IMAGE_PIXELS = 64_000_000  # a larger image is refused, not decoded (a decompression bomb)


@dataclass
class TaskRequest:
    images: list[bytes]  # encoded image files
    texts: list[str]
    top_k: int | None = None


TASK_KEYS = ("image", "images", "text", "texts")
TOP_K_KEYS = (*TASK_KEYS, "top_k")


def parse_task_request(
    body: bytes,
    content_type: str,
    query_texts: list[str],
    max_texts: int,
    top_k: str | None = None,
    route: str = "/v1/itm",
) -> TaskRequest:
    """The images and texts of a task request, JSON or raw bytes, with one-line reasons for bad ones.

    `route`: the route asked, which decides whether `top_k` is taken (TOP_K_ROUTES). A key the
    route does not take is refused by name rather than ignored, so a misspelled "txts" is not
    answered as if no texts were sent.
    """
    takes_top_k = route in TOP_K_ROUTES
    if top_k is not None and not takes_top_k:
        raise RequestError(400, f"top_k is taken by {' and '.join(TOP_K_ROUTES)} only")
    if content_type.split(";")[0].strip().lower() == "application/json":
        request = _json_object(body, 'a task request is a JSON object: {"image": "<base64>", "texts": ["..."]}')
        if query_texts:
            raise RequestError(
                400, 'give the texts in the JSON body or as ?text=, not both (a JSON body takes "texts")'
            )
        known = TOP_K_KEYS if takes_top_k else TASK_KEYS
        unknown = [key for key in request if key not in known]
        if unknown:
            raise RequestError(400, f"unknown key {unknown[0]!r}: {route} takes {', '.join(known)}")
        images = _listed(request, "image", "images")
        texts = _listed(request, "text", "texts")
        decoded = [_base64(value, index) for index, value in enumerate(images)]
        if "top_k" in request and top_k is not None:
            raise RequestError(400, "give top_k in the JSON body or as ?top_k=, not both")
        top_k = request.get("top_k", top_k)
    else:
        decoded, texts = ([body] if body else []), query_texts
    if not decoded:
        raise RequestError(400, 'no image: send {"image": "<base64>"} as JSON, or the image file as the body')
    if not texts:
        raise RequestError(400, 'no text: send {"texts": ["..."]} as JSON, or ?text=... with a raw image body')
    if not all(isinstance(text, str) and text.strip() for text in texts):
        raise RequestError(400, "every text must be a non-empty string")
    if len(texts) > max_texts or len(decoded) > max_texts:
        raise RequestError(413, f"at most {max_texts} images and {max_texts} texts per request: split the request")
    return TaskRequest(decoded, list(texts), _top_k(top_k))


def parse_search_request(
    body: bytes, content_type: str, query_texts: list[str], top_k: str | None, takes: str = "text"
) -> TaskRequest:
    """The query (and top_k) of a /v1/search request. A gallery of images `takes` a text:
    `{"text": "...", "top_k": 5}` as JSON, or `?text=...&top_k=5` with no body. A gallery of captions
    takes an image: `{"image": "<base64>", "top_k": 5}`, or the image file as the body with `?top_k=`."""
    keys = (takes, "top_k")
    is_json = content_type.split(";")[0].strip().lower() == "application/json" and body
    if is_json:
        request = _json_object(body, f'a search request is a JSON object: {{"{takes}": ..., "top_k": 5}}')
        unknown = [key for key in request if key not in keys]
        if unknown:
            raise RequestError(400, f"unknown key {unknown[0]!r}: /v1/search of this gallery takes {', '.join(keys)}")
        if query_texts or top_k is not None:
            raise RequestError(400, f"give the {takes} and top_k in the JSON body or in the query, not both")
        given, top_k = ([request[takes]] if takes in request else []), request.get("top_k")
    if takes == "image":
        if query_texts:
            raise RequestError(400, "this server's gallery holds captions: /v1/search ranks them against an image")
        images = [_base64(value, index) for index, value in enumerate(given)] if is_json else ([body] if body else [])
        if len(images) != 1:
            raise RequestError(400, 'no image: send {"image": "<base64>"} as JSON, or the image file as the body')
        return TaskRequest(images, [], _top_k(top_k))
    if not is_json:
        if body:
            raise RequestError(400, '/v1/search takes no image: send {"text": "..."} as JSON, or ?text=... and no body')
        given = query_texts
    if len(given) != 1:
        raise RequestError(400, f"/v1/search ranks the gallery against one text, got {len(given)}")
    if not isinstance(given[0], str) or not given[0].strip():
        raise RequestError(400, "the text must be a non-empty string")
    return TaskRequest([], given, _top_k(top_k))


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    """The request body as a JSON object; `what`: the refusal of valid JSON of another kind."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise RequestError(400, what)
    return request


def _listed(request: dict[str, Any], one: str, many: str) -> list[Any]:
    if one in request and many in request:
        raise RequestError(400, f'give "{one}" or "{many}", not both')
    if one in request:
        if isinstance(request[one], list):
            raise RequestError(400, f'"{one}" is one value: give a list as "{many}"')
        return [request[one]]
    value = request.get(many, [])
    if not isinstance(value, list):
        raise RequestError(400, f'"{many}" must be a list')
    return value


def _base64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"image {index} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"image {index} is not valid base64") from None


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    # int() would take 1.5 as 1 and true as 1: only a whole number, or its digits in a query, is one.
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole and not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        raise RequestError(400, f"top_k must be a whole number, got {value!r}")
    number = int(value)
    if number < 1:
        raise RequestError(400, f"top_k must be at least 1, got {number}")
    return number


def decode_image(data: bytes, index: int, image_processor: Any) -> Any:
    """An RGB PIL image from encoded bytes; a 415 where the bytes are not an image or its pixels
    have no 8-bit reading, a 413 where it is too large, a 400 where the checkpoint's image processor
    cannot resize it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise RequestError(
                    413, f"image {index} is {image.width}x{image.height}: at most {MAX_IMAGE_PIXELS} pixels"
                )
            problem = resize_problem(*upright_size(image), image_processor)
            if problem:
                raise RequestError(400, f"image {index} {problem}")
            depth = depth_problem(image)
            if depth:
                raise RequestError(415, f"image {index} {depth}")
            return upright_rgb(image)
    except RequestError:
        raise
    except Image.DecompressionBombError:  # PIL refuses it before its size can be read
        raise RequestError(
            413, f"image {index} is past PIL's decompression limit: at most {MAX_IMAGE_PIXELS} pixels"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(415, f"image {index} is not an image file PIL can read (JPEG, PNG, ...)") from None


def check_text_lengths(processor: Any, texts: list[str], limit: int) -> None:
    """A text longer than the model's positions is refused, not silently cut."""
    problem = text_length_problem(processor.tokenizer, texts, limit)
    if problem:
        raise RequestError(400, problem)


@dataclass(frozen=True)
class Task:
    head: str
    description: str

    def answer(
        self, outputs: dict[str, np.ndarray], texts: list[str], feeds: dict[str, np.ndarray], processor: Any, top_k: int
    ) -> list[dict[str, Any]]:
        """The head's answers, as `btdeploy run --json` prints them."""
        return get_head(self.head).behaviour.answers(outputs, texts, feeds, processor, top_k)

    def check(self, processor: Any, texts: list[str], top_k: int) -> None:
        """The head's own rule for its texts (the masked-LM head needs a <mask>), as `btdeploy run`
        applies it, and the bounds of `top_k` where the head takes it."""
        problem = get_head(self.head).behaviour.text_problem(texts, processor.tokenizer)
        if problem:
            raise RequestError(400, problem)
        problem = top_k_problem(top_k)
        if problem:
            raise RequestError(400, problem)


TASKS = {
    "itm": Task("itm", "match probability of the image with each caption"),
    "itc": Task("itc", "text-image cosine of the contrastive embeddings per caption"),
    "mlm": Task("mlm", "each caption with its <mask> tokens filled in"),
}

# The routes that take `top_k`: /v1/rank (how many candidates), and each task whose head ranks
# candidates of its own (/v1/mlm: tokens per <mask>).
TOP_K_ROUTES = (
    "/v1/rank",
    *(f"/v1/{name}" for name, task in TASKS.items() if get_head(task.head).behaviour.takes_top_k),
)
