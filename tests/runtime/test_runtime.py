"""btdeploy.load: the transformers calling convention, conversions, and every bad input's message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import btdeploy
from btdeploy.errors import BtDeployError
from btdeploy.model.inputs import sample_inputs


@pytest.fixture(scope="module")
def itm(tiny_export: Path) -> btdeploy.Runtime:
    return btdeploy.load(tiny_export, head="itm")


@pytest.fixture()
def feeds(itm: btdeploy.Runtime) -> dict[str, np.ndarray]:
    return sample_inputs(itm.config, 2, 7, seed=4)


def test_numpy_in_numpy_out_torch_in_torch_out(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]) -> None:
    as_numpy = itm(**feeds)
    assert isinstance(as_numpy.logits, np.ndarray) and as_numpy.logits.shape == (2, 2)
    as_torch = itm(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert isinstance(as_torch.logits, torch.Tensor)
    assert isinstance(as_torch.logits[0, 1].item(), float)
    np.testing.assert_array_equal(as_torch.logits.numpy(), as_numpy.logits)
    assert as_numpy["logits"] is as_numpy.logits and as_numpy[0] is as_numpy.logits
    assert list(as_numpy.keys()) == ["logits"]


def test_ignored_inputs_change_nothing(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]) -> None:
    plain = itm(**feeds).logits
    extra = itm(**feeds, pixel_mask=np.zeros((2, 64, 64), np.int64), token_type_ids=np.ones((2, 7), np.int64)).logits
    np.testing.assert_array_equal(plain, extra)


def test_int32_ids_bool_mask_and_float64_pixels_are_accepted(
    itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]
) -> None:
    converted = {
        "input_ids": feeds["input_ids"].astype(np.int32),
        "attention_mask": feeds["attention_mask"].astype(bool),
        "pixel_values": feeds["pixel_values"].astype(np.float64),
    }
    np.testing.assert_array_equal(itm(**converted).logits, itm(**feeds).logits)
    # A float mask of 0.0 and 1.0, as transformers takes it; anything else between is refused.
    float_mask = feeds["attention_mask"].astype(np.float32)
    np.testing.assert_array_equal(itm(**{**feeds, "attention_mask": float_mask}).logits, itm(**feeds).logits)
    with pytest.raises(BtDeployError, match="attention_mask must hold only 0 and 1"):
        itm(**{**feeds, "attention_mask": float_mask * 0.5})


def _with(feeds: dict[str, np.ndarray], **changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = dict(feeds)
    for key, value in changes.items():
        if value is None:
            result.pop(key)
        else:
            result[key] = value
    return result


BAD_INPUTS = {
    "missing": (lambda f: _with(f, pixel_values=None), "missing input\\(s\\) pixel_values: the itm head needs"),
    "unknown": (lambda f: _with(f, images=f["pixel_values"]), "unknown input\\(s\\) 'images': the itm head takes"),
    "float ids": (lambda f: _with(f, input_ids=f["input_ids"].astype(np.float32)), "input_ids must be a 2-D integer"),
    "1-D ids": (lambda f: _with(f, input_ids=f["input_ids"][0]), "input_ids must be a 2-D integer"),
    "mask shape": (
        lambda f: _with(f, attention_mask=f["attention_mask"][:, :3]),
        "attention_mask must be .* shaped like",
    ),
    "mask values": (
        lambda f: _with(f, attention_mask=f["attention_mask"] * 2),
        "attention_mask must hold only 0 and 1",
    ),
    "int pixels": (
        lambda f: _with(f, pixel_values=f["pixel_values"].astype(np.int64)),
        "pixel_values must be a 4-D float",
    ),
    "image size": (
        lambda f: _with(f, pixel_values=np.zeros((2, 3, 96, 96), np.float32)),
        "pixel_values has images of \\[3, 96, 96\\], the model takes \\[3, 64, 64\\]",
    ),
    "too long": (
        lambda f: _with(f, input_ids=np.zeros((2, 513), np.int64), attention_mask=np.ones((2, 513), np.int64)),
        "text of 513 tokens is longer than the model's 512 positions",
    ),
    "batch": (lambda f: _with(f, pixel_values=f["pixel_values"][:1]), "batch sizes disagree: 2 text\\(s\\) .* 1 image"),
    "vocab": (lambda f: _with(f, input_ids=f["input_ids"] + 5000), "input_ids has ids outside the vocabulary 0..999"),
    "empty": (
        lambda f: _with(f, input_ids=np.zeros((2, 0), np.int64), attention_mask=np.zeros((2, 0), np.int64)),
        "input_ids is empty",
    ),
    "wrong type": (lambda f: _with(f, input_ids="hello"), "input_ids must be a numpy array or torch tensor, got str"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_line(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray], case: str) -> None:
    make, message = BAD_INPUTS[case]
    with pytest.raises(BtDeployError, match=message) as caught:
        itm(**make(feeds))
    assert "\n" not in str(caught.value)


def test_output_attribute_typo_names_the_real_outputs(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]) -> None:
    with pytest.raises(AttributeError, match="has no output 'logit'; it has logits"):
        _ = itm(**feeds).logit


def test_load_needs_a_head_when_the_folder_has_several(tiny_export: Path) -> None:
    with pytest.raises(BtDeployError, match="holds several heads \\(base, itc, itm, mlm\\): choose one \\(head="):
        btdeploy.load(tiny_export)
    with pytest.raises(BtDeployError, match="has no exported head\\(s\\) nope"):
        btdeploy.load(tiny_export, head="nope")
    assert btdeploy.load(tiny_export / "mlm").head.name == "mlm"
    with pytest.raises(BtDeployError, match="unknown backend 'tensorflow'"):
        btdeploy.load(tiny_export, head="itm", backend="tensorflow")


def test_a_corrupt_or_missing_model_file_is_a_clear_error(tiny_export: Path, tmp_path: Path) -> None:
    head = tmp_path / "itm"
    shutil.copytree(tiny_export / "itm", head)
    data = (head / "model.onnx").read_bytes()
    (head / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BtDeployError, match=r"model.onnx is not the graph its manifest recorded \(\d+ bytes, recorded"):
        btdeploy.load(head)
    # A manifest without graph records (written by hand, or by an older btdeploy): ONNX Runtime says it.
    manifest = json.loads((head / "manifest.json").read_text())
    del manifest["graphs"]
    (head / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BtDeployError, match="ONNX Runtime cannot load .*damaged or incomplete: export the head again"):
        btdeploy.load(head)
    (head / "model.onnx").unlink()
    with pytest.raises(BtDeployError, match="model.onnx is missing: export the head again"):
        btdeploy.load(head)
    (head / "manifest.json").write_text("{not json")
    with pytest.raises(BtDeployError, match="manifest.json is damaged"):
        btdeploy.load(head)
    with pytest.raises(BtDeployError, match="does not exist"):
        btdeploy.load(tmp_path / "absent")


def test_torch_backend_is_the_reference(tiny_export: Path, feeds: dict[str, np.ndarray]) -> None:
    from transformers import BridgeTowerForImageAndTextRetrieval

    from btdeploy.model.checkpoints import resolve_model

    reference = btdeploy.load(tiny_export, head="itm", backend="torch")
    model = BridgeTowerForImageAndTextRetrieval.from_pretrained(resolve_model("tiny").checkpoint).eval()
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
        # the image token type the runtime takes at 0, 1 and None: all one to transformers
        for token_type in (0, 1):
            same = model(**inputs, image_token_type_idx=token_type).logits.numpy()
            np.testing.assert_array_equal(same, expected)
    np.testing.assert_allclose(reference(**feeds).logits, expected, atol=1e-6, rtol=0)


def test_without_attention_mask_every_token_counts_as_in_transformers(itm: btdeploy.Runtime, tiny_export: Path) -> None:
    from transformers import BridgeTowerForImageAndTextRetrieval

    from btdeploy.model.checkpoints import resolve_model

    feeds = sample_inputs(itm.config, 2, 7, seed=5, pad=False)
    unmasked = {"input_ids": feeds["input_ids"], "pixel_values": feeds["pixel_values"]}
    model = BridgeTowerForImageAndTextRetrieval.from_pretrained(resolve_model("tiny").checkpoint).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in unmasked.items()}).logits.numpy()
    np.testing.assert_allclose(itm(**unmasked).logits, expected, atol=1e-5, rtol=0)
    # A padded batch without its mask attends to the padding too, as the reference does.
    padded = sample_inputs(itm.config, 2, 7, seed=5, pad=True)
    assert not padded["attention_mask"].all()
    without = itm(input_ids=padded["input_ids"], pixel_values=padded["pixel_values"]).logits
    np.testing.assert_array_equal(without, itm(**{**padded, "attention_mask": np.ones((2, 7), np.int64)}).logits)


def test_every_transformers_call_form_gives_the_same_answer(
    itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]
) -> None:
    expected = itm(**feeds).logits
    ids, mask, pixels = feeds["input_ids"], feeds["attention_mask"], feeds["pixel_values"]
    forms = {
        "encoding": itm(feeds),
        "positional, forward() order": itm(ids, mask, None, pixels),
        "positional and keywords": itm(ids, mask, pixel_values=pixels),
        "forward": itm.forward(**feeds),
        "defaults spelled out": itm(**feeds, return_dict=True, output_hidden_states=False, labels=None),
        # passed on to BridgeTowerModel, which reads None and 0 as 1 (the reference test holds it to that)
        "image token type 1": itm(**feeds, image_token_type_idx=1),
        "image token type 0": itm(**feeds, image_token_type_idx=torch.tensor(0)),
    }
    for form, outputs in forms.items():
        np.testing.assert_array_equal(outputs.logits, expected, err_msg=form)
    as_tuple = itm(**feeds, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    np.testing.assert_array_equal(as_tuple[0], expected)
    # What code written for a torch module calls on the model before using it.
    assert itm.eval() is itm and itm.to("cpu") is itm and itm.to(torch.device("cpu")) is itm
    assert itm.device == torch.device("cpu")
    # as transformers' examples cast an encoding: BatchFeature.to(model.device, model.dtype)
    from transformers import BatchFeature

    encoding = BatchFeature({k: torch.from_numpy(v) for k, v in feeds.items()}).to(itm.device, itm.dtype)
    assert itm.dtype == torch.float32 and encoding["pixel_values"].dtype == torch.float32
    np.testing.assert_array_equal(itm(**encoding).logits.numpy(), expected)
    with pytest.raises(BtDeployError, match=r"does not move to cuda:0: the backend chooses the device when it loads"):
        itm.to("cuda:0")
    assert itm.cpu() is itm
    with pytest.raises(BtDeployError, match=r"does not move to cuda:1: the backend chooses the device"):
        itm.cuda(1)
    with pytest.raises(BtDeployError, match=r"does not change precision: .*precision='fp16'"):
        itm.half()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("output_hidden_states", True, "output_hidden_states is not supported.*run the transformers model"),
        ("output_attentions", True, "output_attentions is not supported"),
        ("labels", torch.tensor([1, 0]), "labels is not supported.*computes no loss"),
        ("inputs_embeds", np.zeros((2, 7, 64), np.float32), "inputs_embeds is not supported.*pass token ids"),
        ("interpolate_pos_encoding", True, "interpolate_pos_encoding is not supported"),
        ("image_token_type_idx", 2, "image_token_type_idx=2 is not supported: .*type 1.*leave it out"),
    ],
)
def test_what_a_graph_cannot_do_is_refused_by_name(
    itm: btdeploy.Runtime, feeds: dict[str, np.ndarray], option: str, value: Any, message: str
) -> None:
    with pytest.raises(BtDeployError, match=message):
        itm(**feeds, **{option: value})


def test_positional_inputs_beyond_forward_or_given_twice_are_refused(
    itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]
) -> None:
    ids, mask, pixels = feeds["input_ids"], feeds["attention_mask"], feeds["pixel_values"]
    with pytest.raises(BtDeployError, match="attention_mask given both by position and by name"):
        itm(ids, mask, None, pixels, attention_mask=mask)
    with pytest.raises(BtDeployError, match="8 positional inputs.*pass them by name"):
        itm(ids, mask, None, pixels, None, None, None, None)
    # transformers' third parameter is token_type_ids: images there are named, not "missing pixel_values"
    with pytest.raises(BtDeployError, match="third positional input is token_type_ids.*pass pixel_values by name"):
        itm(ids, mask, pixels)
    with pytest.raises(BtDeployError, match="third positional input is token_type_ids"):
        itm(ids, mask, torch.from_numpy(pixels))


def test_the_contrastive_head_answers_in_transformers_order(tiny_export: Path) -> None:
    """out[0] and to_tuple() index the outputs as transformers' BridgeTowerContrastiveOutput does."""
    from transformers import BridgeTowerForContrastiveLearning

    from btdeploy.model.checkpoints import resolve_model

    itc = btdeploy.load(tiny_export, head="itc")
    feeds = {k: torch.from_numpy(v) for k, v in sample_inputs(itc.config, 2, 7, seed=6).items()}
    model = BridgeTowerForContrastiveLearning.from_pretrained(resolve_model("tiny").checkpoint).eval()
    with torch.no_grad():
        expected = model(**feeds, return_dict=False)
    got = itc(**feeds, return_dict=False)
    assert len(got) == 4 and list(itc(**feeds)) == ["logits", "text_embeds", "image_embeds", "cross_embeds"]
    for index, value in enumerate(got):
        torch.testing.assert_close(value, expected[index], atol=1e-5, rtol=0)
    # the ModelOutput forms: positions of any integer type, slices, and a named key that is not there
    with torch.no_grad():
        as_output = model(**feeds)
    out = itc(**feeds)
    logits, text_embeds = out[:2]
    reference_logits, reference_text = as_output[:2]
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_embeds, reference_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[np.int64(-4)], as_output[0], atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="the 'itc' head has no output 'logit'; it has logits, text_embeds"):
        out["logit"]
    assert out.get("logit") is None and "loss" not in out


def test_a_loaded_runtime_goes_to_another_process(tiny_export: Path, feeds: dict[str, np.ndarray]) -> None:
    """Pickled as the way it was loaded: a worker process (or a Ray task) loads the same graph."""
    import multiprocessing
    import operator
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    runtime = btdeploy.load(tiny_export / "itm", threads=1)
    again = pickle.loads(pickle.dumps(runtime))
    assert type(again) is type(runtime) and again.backend.description == runtime.backend.description
    np.testing.assert_array_equal(again(**feeds).logits, runtime(**feeds).logits)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        answered = pool.submit(operator.call, runtime, **feeds).result(timeout=120)
    np.testing.assert_array_equal(answered.logits, runtime(**feeds).logits)
    made_by_hand = btdeploy.Runtime(runtime.manifest, runtime.backend)
    with pytest.raises(BtDeployError, match="not made by btdeploy.load, so it cannot be pickled"):
        pickle.dumps(made_by_hand)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_threads_calling_one_loaded_model_each_get_their_own_answer(tiny_export: Path, backend: str) -> None:
    """A threaded server calls one loaded model from several threads at once, as it may a torch
    model. OpenVINO ran them on one infer request ("Infer Request is busy" from deep inside it)."""
    from concurrent.futures import ThreadPoolExecutor

    model = btdeploy.load(tiny_export, head="itm", backend=backend)
    cases = [sample_inputs(model.config, 1 + i % 3, 5 + i % 4, seed=i) for i in range(12)]
    alone = [model(**case).logits for case in cases]
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            together = list(pool.map(lambda case: model(**case).logits, cases))
            for got, want in zip(together, alone, strict=True):
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_read_only_inputs_answer_as_writable_ones_without_a_warning(tiny_export: Path, backend: str) -> None:
    """Arrays from np.frombuffer or a memory map are read-only; torch warned of undefined behaviour."""
    import warnings

    model = btdeploy.load(tiny_export, head="itm", backend=backend)
    feeds = sample_inputs(model.config, 2, 6, seed=8)
    frozen = {name: value.copy() for name, value in feeds.items()}
    for value in frozen.values():
        value.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(model(**frozen).logits, model(**feeds).logits)


_FORKED_WORKER = """
import gc, os, sys, time
running_at_fork = []
def look_at_threads():
    from btdeploy.forks import running_threads_besides_this_one
    running_at_fork.append(running_threads_besides_this_one())
os.register_at_fork(before=look_at_threads)  # first registered: called after btdeploy's own hook
import numpy as np
import btdeploy
from btdeploy.model.inputs import sample_inputs

folder, backend, whose = sys.argv[1], sys.argv[2], sys.argv[3]
model = btdeploy.load(folder, head="itm", backend=backend)
feeds = sample_inputs(model.config, 4, 24, seed=9)
want = model(**feeds).logits  # the parent's thread pool is running now
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    # A worker's whole life: it answers, drops the model and ends normally (sys.exit: the interpreter
    # finalizes, as a gunicorn worker does), not by os._exit, which frees nothing.
    import faulthandler
    faulthandler.dump_traceback_later(60, exit=True)  # a hang in a run prints every stack
    if whose == "its own":
        model = btdeploy.load(folder, head="itm", backend=backend)
    answer = np.ascontiguousarray(model(**feeds).logits, dtype=np.float32)
    model(**feeds)
    os.write(write_end, answer.tobytes())
    os.close(write_end)
    del model
    gc.collect()
    print("child freed the model", flush=True)
    sys.exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    answer = pipe.read()
deadline = time.monotonic() + 120
while (ended := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
if ended[0] == 0:
    os.kill(child, 9)
    sys.exit("the child did not end in 120 s")
status = ended[1]
if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
    sys.exit(f"the child ended with status {status}")
np.testing.assert_array_equal(np.frombuffer(answer, np.float32).reshape(want.shape), want)
print("parent saw the same logits", flush=True)
print(f"threads running at the fork: {running_at_fork}", flush=True)
if backend == "torch":  # how many threads the child had to drop to one
    import torch
    print(torch.get_num_threads(), flush=True)
"""


@pytest.mark.parametrize("whose", ["inherited", "its own"])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_a_forked_worker_answers_and_ends(tiny_export: Path, backend: str, whose: str) -> None:
    """A web server loads once and forks its workers (gunicorn --preload), or a worker loads its own
    model after its parent had run one. torch's thread pool does not survive fork: a child running on
    two threads hung for good, with the inherited model and with its own. ONNX Runtime's session
    and OpenVINO's compiled model never return from being freed in the child that inherited them:
    a worker that dropped the model, or ended normally, hung there. Forked right after a run, while
    the pool's workers were going to sleep, a child's run waited for good on a lock one of them had
    held (ONNX Runtime in 7 of 75 forks), so the fork now waits for them (btdeploy/forks.py)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FORKED_WORKER, str(tiny_export), backend, whose],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # The pool's workers asleep when the fork came: none holds a lock of theirs into the child.
    assert lines[:3] == ["child freed the model", "parent saw the same logits", "threads running at the fork: [0]"]
    notices = [line for line in done.stderr.splitlines() if "this process was forked after" in line]
    # One thread in the child: an inherited model on every backend; the child's own model where the
    # pool is the process's (not ONNX Runtime's); torch says so where it had more than one to drop
    # (the subprocess's own count: an xdist worker may run on one).
    one_thread = whose == "inherited" or backend != "onnxruntime"
    expected = 1 if one_thread and (backend != "torch" or int(lines[3]) > 1) else 0
    assert len(notices) == expected, done.stderr[-3000:]  # once, though the child ran twice
    assert all(f"] {backend} backend:" in n and "runs on one thread here" in n for n in notices)


_LOAD_TOGETHER = """
import sys
from concurrent.futures import ThreadPoolExecutor

import btdeploy
from btdeploy.model.inputs import sample_inputs

specs = [("itm", "onnxruntime"), ("itc", "openvino"), ("mlm", "openvino"), ("itm", "torch"), ("base", "onnxruntime")]


def load_and_run(spec):
    model = btdeploy.load(sys.argv[1], head=spec[0], backend=spec[1])
    return type(model(**sample_inputs(model.config, 2, 6, seed=1))).__name__


with ThreadPoolExecutor(len(specs)) as pool:
    print(" ".join(pool.map(load_and_run, specs)))
"""


def test_heads_loaded_by_several_threads_at_once_in_a_fresh_process(tiny_export: Path) -> None:
    """The first imports of transformers race in its lazy module: five heads loaded from a thread
    pool failed with ImportError: cannot import name 'BridgeTowerConfig' (btdeploy/imports.py)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _LOAD_TOGETHER, str(tiny_export)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["HeadOutput"] * 5


_LOAD_ALONE = """
import sys

import btdeploy
from btdeploy.model.inputs import sample_inputs

model = btdeploy.load(sys.argv[1], head="itm")
model(**sample_inputs(model.config, 2, 6, seed=1))
print(model.config.text_config.vocab_size, "torch" in sys.modules, "transformers" in sys.modules)
"""


def test_a_loaded_head_runs_without_torch_or_transformers(tiny_export: Path) -> None:
    """The runtime reads the config its manifest stored as plain values: rebuilding transformers'
    config class imported transformers and torch with it, 4.7 s of a 4.8 s tiny load and 210 MB."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _LOAD_ALONE, str(tiny_export)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tiny_export / "itm" / "manifest.json").read_text())
    assert done.stdout.split() == [str(manifest["model"]["config"]["text_config"]["vocab_size"]), "False", "False"]
