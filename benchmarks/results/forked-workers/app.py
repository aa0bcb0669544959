"""A WSGI app as a preforking server runs it (gunicorn --preload): the model is loaded, and run once,
in the master at import; the workers forked from it answer requests with it. See README.md."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import btdeploy
from btdeploy.model.inputs import sample_inputs

MODEL = btdeploy.load(os.environ["EXPORT"], head="itm", backend=os.environ.get("BACKEND", "onnxruntime"))
FEEDS = sample_inputs(MODEL.config, 1, 16, seed=3)
MODEL(**FEEDS)  # a warm-up in the master, as a preloaded app often does


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    logits = MODEL(**FEEDS).logits
    body = json.dumps({"pid": os.getpid(), "logit": float(logits[0, 1])}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
