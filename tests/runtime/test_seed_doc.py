"""The three examples of the documentation page users start from, run through btdeploy.load.

The examples are read from the page itself (tests/data/bridgetower_doc.md, a copy of the seed
document) and executed unchanged except for what must change offline: `requests` serves a
local picture, hub ids point at a preset checkpoint (tiny), and the model line becomes
`btdeploy.load(...)`. Each example runs twice, once with the transformers model and once with
btdeploy, and the two must agree: on each backend `load` runs the ONNX graphs with (ONNX Runtime,
OpenVINO), whole and as split towers.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import btdeploy
from btdeploy.export.exporter import export_heads
from btdeploy.model.checkpoints import resolve_model

DOC = Path(__file__).parents[1] / "data" / "bridgetower_doc.md"
MODEL_LINE = re.compile(r"^model = (BridgeTower\w+)\.from_pretrained\((\"[^\"]+\")\)$", re.M)
HUB_ID = re.compile(r"\"BridgeTower/[^\"]+\"")
HEAD_OF_CLASS = {
    "BridgeTowerForContrastiveLearning": "itc",
    "BridgeTowerForImageAndTextRetrieval": "itm",
    "BridgeTowerForMaskedLM": "mlm",
}


def doc_examples() -> list[str]:
    """The ```python blocks of the page as runnable code (prompts stripped, loop bodies indented)."""
    examples = []
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        lines, in_loop = [], False
        for raw in block.splitlines():
            if raw.startswith(">>> "):
                code = raw[4:]
                in_loop = code.rstrip().endswith(":")
                lines.append(code)
            elif raw.startswith("..."):
                code = raw[4:] if raw.startswith("... ") else ""
                # The page lost the loop bodies' indentation; restore it.
                lines.append(("    " + code) if in_loop and not code.startswith(" ") else code)
            # anything else is expected output
        examples.append("\n".join(lines))
    return examples


def fake_requests() -> types.ModuleType:
    """`requests.get(url, stream=True).raw` answering with a local picture, different per URL."""
    module = types.ModuleType("requests")

    def get(url: str, stream: bool = False) -> Any:
        rng = np.random.default_rng(abs(hash(url)) % 2**32)
        buffer = io.BytesIO()
        Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8)).save(buffer, format="JPEG")
        buffer.seek(0)
        return types.SimpleNamespace(raw=buffer)

    module.get = get  # type: ignore[attr-defined]
    return module


# The ways `btdeploy.load` runs an exported head, as the keyword arguments of the model line.
LOADS = {
    "onnxruntime": "",
    "onnxruntime-split": ", split=True",
    "openvino": ', backend="openvino"',
    "openvino-split": ', backend="openvino", split=True',
}


def run_example(
    code: str, checkpoint: Path, export_dir: Path | None, load_options: str = ""
) -> tuple[dict[str, Any], str]:
    head_class = MODEL_LINE.search(code)
    assert head_class, "the example has no `model = BridgeTower*.from_pretrained(...)` line"
    if export_dir is not None:
        head = HEAD_OF_CLASS[head_class.group(1)]
        code = MODEL_LINE.sub(f'model = btdeploy.load("{export_dir}", head="{head}"{load_options})', code)
    code = HUB_ID.sub(f'"{checkpoint}"', code)
    namespace: dict[str, Any] = {"btdeploy": btdeploy}
    printed = io.StringIO()
    original = sys.modules.get("requests")
    sys.modules["requests"] = fake_requests()
    try:
        with contextlib.redirect_stdout(printed), torch.no_grad():
            exec(compile(code, "<seed example>", "exec"), namespace)
    finally:
        if original is None:
            sys.modules.pop("requests", None)
        else:
            sys.modules["requests"] = original
    return namespace, printed.getvalue()


@pytest.fixture(scope="module")
def doc_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A preset checkpoint and its itc, itm and mlm exports, whole and split. The tiny preset: the examples need
    the architecture, tokenizer and processor a preset writes, not the base size (the base preset
    is the same code at another config, tests/model/test_models.py; its pipeline is measured in
    benchmarks/results/base-main-job)."""
    source = resolve_model("tiny")
    out = tmp_path_factory.mktemp("doc-export")
    export_heads(source, list(HEAD_OF_CLASS.values()), out, split=True)
    return source.checkpoint, out


@pytest.fixture(params=list(LOADS))
def load_options(request: pytest.FixtureRequest) -> str:
    return LOADS[request.param]


def test_the_page_has_the_three_examples() -> None:
    examples = doc_examples()
    assert len(examples) == 3
    assert [MODEL_LINE.search(e).group(1) for e in examples] == list(HEAD_OF_CLASS)  # type: ignore[union-attr]


def test_contrastive_example(doc_models: tuple[Path, Path], load_options: str) -> None:
    checkpoint, export_dir = doc_models
    code = doc_examples()[0]
    expected, _ = run_example(code, checkpoint, None)
    got, _ = run_example(code, checkpoint, export_dir, load_options)
    assert list(got["scores"]) == list(expected["scores"]) and len(got["scores"]) == 2
    for text, outputs in got["scores"].items():
        reference = expected["scores"][text]
        for name in ("text_embeds", "image_embeds", "cross_embeds", "logits"):
            assert isinstance(outputs[name], torch.Tensor)
            assert outputs[name].shape == reference[name].shape
            torch.testing.assert_close(outputs[name], reference[name], atol=1e-4, rtol=0)


def test_retrieval_example(doc_models: tuple[Path, Path], load_options: str) -> None:
    checkpoint, export_dir = doc_models
    code = doc_examples()[1]
    expected, _ = run_example(code, checkpoint, export_dir=None)
    got, _ = run_example(code, checkpoint, export_dir, load_options)
    assert set(got["scores"]) == set(expected["scores"]) and len(got["scores"]) == 2
    for text, value in got["scores"].items():
        assert isinstance(value, float)
        assert abs(value - expected["scores"][text]) <= 1e-4, (text, value, expected["scores"][text])


def test_masked_lm_example(doc_models: tuple[Path, Path], load_options: str) -> None:
    checkpoint, export_dir = doc_models
    code = doc_examples()[2]
    expected, expected_printed = run_example(code, checkpoint, export_dir=None)
    got, got_printed = run_example(code, checkpoint, export_dir, load_options)
    torch.testing.assert_close(got["outputs"].logits, expected["outputs"].logits, atol=1e-4, rtol=0)
    # Random weights predict near-ties; the decoded words agree wherever the top-2 margin is clear.
    top2 = expected["outputs"].logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2e-4
    agree = got["outputs"].logits.argmax(-1) == expected["outputs"].logits.argmax(-1)
    assert clear.float().mean() > 0.9 and bool(agree[clear].all())
    if bool(clear.all()):
        assert got["results"] == expected["results"] and got_printed == expected_printed
    assert got_printed.strip() and "<mask>" not in got_printed
