"""btdeploy's own reading of the export's processor against transformers' BridgeTowerProcessor:
the same pixels and ids, bit for bit, and the folders it leaves to transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import markdown_table, markdown_tables, run_benchmark
from PIL import Image

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.configs import build_config
from btdeploy.model.media import export_processor
from btdeploy.model.preprocessor import Preprocessor, unread_setting

ICONS = sorted(Path("/usr/share/icons/Adwaita/512x512").glob("*/*.png"))[:6]

TEXTS = [
    "a photo of a <mask> cat.",
    "hello",
    "   leading spaces, a <mask>and no space",
    "",
    "Ünïcödé ✓ 日本語 text! ",
    "two\nlines\tand tabs",
    "<mask><mask> . <s> </s> <pad>",
    "word " * 90,
]


def _transformers_processor(folder: Path) -> Any:
    from transformers import BridgeTowerProcessor

    return BridgeTowerProcessor.from_pretrained(folder)


def _saved_processor(folder: Path, preset: str, **image_settings: Any) -> Path:
    """A preset's processor as export writes it, with image settings changed where given."""
    from btdeploy.model.checkpoints import build_processor

    processor = build_processor(build_config(preset))
    for name, value in image_settings.items():
        setattr(processor.image_processor, name, value)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["tiny", "base", "edited"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp(request.param)
    if request.param == "edited":  # every setting read here away from the presets' values
        edge = {"shortest_edge": 96}
        return _saved_processor(
            where, "tiny", size=edge, crop_size={"shortest_edge": 80}, size_divisor=16, resample=2,
            rescale_factor=1 / 250, image_mean=[0.5, 0.25, 0.125], image_std=[0.2, 0.3, 0.4],
        )  # fmt: skip
    return _saved_processor(where, request.param)


def _pictures() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    noise = [
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        # square, odd sizes, one pixel past a multiple, smaller than the crop, long enough that the
        # crop pads (the capped longer side leaves the shorter one under the crop size)
        for height, width in [(64, 64), (33, 47), (289, 288), (9, 7), (640, 480), (60, 150), (150, 60)]
    ]
    return [Image.open(path).convert("RGB") for path in ICONS] + noise


def test_pixels_are_transformers_own_bit_for_bit(folder: Path) -> None:
    assert unread_setting(folder) is None
    ours, theirs = Preprocessor.from_folder(folder), _transformers_processor(folder)
    pictures = _pictures()
    assert len(pictures) >= 10, "the icons this test reads are missing"
    for picture in pictures:
        mine, reference = ours(images=[picture]), theirs(images=[picture], return_tensors="np")
        assert set(mine) == set(reference) == {"pixel_values", "pixel_mask"}
        for name, value in reference.items():
            assert mine[name].dtype == value.dtype, (name, picture.size)
            np.testing.assert_array_equal(mine[name], value, err_msg=f"{name} of a {picture.size} image")
    # A batch of sizes at once, as numpy arrays as well as PIL pictures.
    arrays = [np.asarray(picture) for picture in pictures[:4]]
    reference = theirs(images=pictures[:4], return_tensors="np")
    for mine in (ours(images=pictures[:4]), ours(images=arrays)):
        for name, value in reference.items():
            np.testing.assert_array_equal(mine[name], value)


@pytest.mark.parametrize(
    "options",
    [
        {"padding": True},
        {"padding": "longest"},
        {"padding": "max_length", "truncation": True, "max_length": 16},
        {"padding": True, "truncation": True, "max_length": 7},
        {"padding": "max_length", "max_length": 400},
    ],
)
def test_ids_are_transformers_own(folder: Path, options: dict[str, Any]) -> None:
    ours, theirs = Preprocessor.from_folder(folder), _transformers_processor(folder)
    mine, reference = ours(text=TEXTS, **options), theirs(text=TEXTS, return_tensors="np", **options)
    assert set(mine) == set(reference) == {"input_ids", "attention_mask"}
    for name, value in reference.items():
        assert mine[name].dtype == value.dtype
        np.testing.assert_array_equal(mine[name], value, err_msg=name)
    # Unpadded, as lists: the length check of every command reads them so.
    lists = ours.tokenizer(TEXTS, verbose=False)
    assert lists["input_ids"] == theirs.tokenizer(TEXTS, verbose=False)["input_ids"]


def test_texts_and_images_together_and_the_tokenizer_facts(folder: Path) -> None:
    ours, theirs = Preprocessor.from_folder(folder), _transformers_processor(folder)
    pictures = _pictures()[:3]
    mine = ours(pictures, TEXTS[:3], padding=True, return_tensors="np")
    reference = theirs(pictures, TEXTS[:3], padding=True, return_tensors="np")
    assert set(mine) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(mine[name], value, err_msg=name)
    for fact in ("mask_token", "mask_token_id", "pad_token_id", "model_max_length", "padding_side"):
        assert getattr(ours.tokenizer, fact) == getattr(theirs.tokenizer, fact), fact
    assert ours.image_processor.size == dict(theirs.image_processor.size)


def test_decoding_is_transformers_own(folder: Path) -> None:
    ours, theirs = Preprocessor.from_folder(folder), _transformers_processor(folder)
    rng = np.random.default_rng(3)
    vocabulary = len(theirs.tokenizer)
    rows = [rng.integers(0, vocabulary, 40).tolist() for _ in range(20)]
    rows += ours.tokenizer(TEXTS)["input_ids"]
    for ids in rows:
        for skip in (False, True):
            assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == theirs.tokenizer.decode(
                ids, skip_special_tokens=skip
            )
        assert [ours.tokenizer.decode([token]) for token in ids[:8]] == [
            theirs.tokenizer.decode([token]) for token in ids[:8]
        ]


def test_threads_that_tokenize_at_once_each_get_their_own_padding(tmp_path: Path) -> None:
    """A serve gateway tokenizes in several threads: padding and truncation are per call, not a
    setting of the shared tokenizer that one thread could change under another."""
    tokenizer = Preprocessor.from_folder(_saved_processor(tmp_path, "tiny")).tokenizer
    calls = [
        {"padding": "max_length", "truncation": True, "max_length": 6 + i % 5} if i % 2 else {"padding": True}
        for i in range(200)
    ]
    alone = [tokenizer(TEXTS, **call)["input_ids"] for call in calls]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda call: tokenizer(TEXTS, **call)["input_ids"], calls))
    assert all(a == b for a, b in zip(alone, together, strict=True))
    assert {len(row) for row in together[1]} == {7}


def _edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda f: _edit_json(f / "processor_config.json", lambda d: d["image_processor"].update(
            size={"height": 64, "width": 80})), "size {'height': 64, 'width': 80} (read here: a shortest edge)"),
        (lambda f: _edit_json(f / "processor_config.json", lambda d: d["image_processor"].update(
            do_convert_rgb=True)), "image processor settings do_convert_rgb"),
        (lambda f: _edit_json(f / "processor_config.json", lambda d: d["image_processor"].update(
            do_center_crop=False)), "do_center_crop false"),
        (lambda f: _edit_json(f / "processor_config.json", lambda d: d["image_processor"].update(
            image_processor_type="CLIPImageProcessor")), "image processor 'CLIPImageProcessor'"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
    ],
)  # fmt: skip
def test_a_folder_it_does_not_read_whole_is_left_to_transformers(
    tmp_path: Path, tiny_export: Path, edit: Any, reason: str
) -> None:
    manifest = read_manifest(tiny_export / "itm")
    head = tmp_path / "itm"
    head.mkdir()
    (head / "manifest.json").write_bytes((manifest.folder / "manifest.json").read_bytes())
    _saved_processor(head / "processor", "tiny")
    if reason == "no tokenizer.json":  # transformers needs the vocabulary in its own files then
        _transformers_processor(head / "processor").tokenizer.save_pretrained(head / "processor", legacy_format=True)
    edit(head / "processor")
    assert unread_setting(head / "processor") == reason
    processor = export_processor(read_manifest(head))
    assert type(processor).__name__ == "BridgeTowerProcessor"


def test_the_old_image_settings_file_is_read_too(tmp_path: Path) -> None:
    """A checkpoint's processor copied by hand may keep its image settings in
    preprocessor_config.json, as transformers before 5 wrote them."""
    folder = _saved_processor(tmp_path, "tiny")
    combined = json.loads((folder / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(combined.pop("image_processor")))
    (folder / "processor_config.json").write_text(json.dumps(combined))
    assert unread_setting(folder) is None
    picture = _pictures()[0]
    np.testing.assert_array_equal(
        Preprocessor.from_folder(folder)(images=[picture])["pixel_values"],
        _transformers_processor(folder)(images=[picture], return_tensors="np")["pixel_values"],
    )


def test_a_damaged_tokenizer_file_is_named(tmp_path: Path) -> None:
    folder = _saved_processor(tmp_path, "tiny")
    _edit_json(folder / "tokenizer.json", lambda d: d["model"].update(vocab="not a vocabulary"))
    with pytest.raises(BtDeployError, match=r"tokenizer\.json cannot be read as a tokenizer .*export the head again"):
        Preprocessor.from_folder(folder)


def test_a_picture_that_is_not_rgb_is_refused_with_what_to_give(tmp_path: Path) -> None:
    processor = Preprocessor.from_folder(_saved_processor(tmp_path, "tiny"))
    for picture in (Image.new("L", (64, 64)), np.zeros((64, 64, 3), np.float32), "photo.png"):
        with pytest.raises(BtDeployError, match="RGB"):
            processor(images=[picture])


@pytest.mark.parametrize("command", ["run", "rank"])
def test_run_and_rank_start_without_transformers_or_torch(tiny_export: Path, command: str) -> None:
    """The point of reading the processor here: the commands that only run graphs import
    neither transformers nor torch (3 s and 340 MB before the first text was read)."""
    image = str(ICONS[0])
    words = (
        ["run", str(tiny_export / "itm"), "--image", image, "--text", "a folder"]
        if command == "run"
        else ["rank", str(tiny_export), "--text", "a folder", "--images", str(ICONS[0].parent)]
    )
    script = (
        "import sys\nfrom btdeploy.cli import main\n"
        f"code = main({words!r})\n"
        "print('imported:', sorted({'torch', 'transformers'} & set(sys.modules)), 'code:', code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: [] code: 0" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_export_finds_the_two_readings_agree_and_says_where_they_would_not(tmp_path: Path, tiny_export: Path) -> None:
    from btdeploy.model.preprocessor import disagreement

    for head in ("itm", "mlm"):  # the export probed each processor it wrote
        assert read_manifest(tiny_export / head).processor_read_by_transformers is None
        folder = tiny_export / head / "processor"
        assert disagreement(folder, _transformers_processor(folder)) is None
    # Against another folder's reading, the probe sees what differs.
    tiny = _saved_processor(tmp_path / "tiny", "tiny")
    darker = _saved_processor(tmp_path / "darker", "tiny", image_mean=[0.6, 0.6, 0.6])
    assert disagreement(tiny, _transformers_processor(darker)) == "its pixel_values differ from transformers'"
    left_padded = _saved_processor(tmp_path / "left", "tiny")
    _edit_json(left_padded / "tokenizer_config.json", lambda d: d.update(padding_side="left"))
    assert disagreement(tiny, _transformers_processor(left_padded)) == "its attention_mask differ from transformers'"


def test_a_processor_export_found_read_otherwise_is_read_with_transformers(tmp_path: Path, tiny_export: Path) -> None:
    from btdeploy.artifacts.manifest import PROCESSOR_READ_BY_TRANSFORMERS

    head = tmp_path / "itm"
    head.mkdir()
    data = json.loads((tiny_export / "itm" / "manifest.json").read_text())
    (head / "manifest.json").write_text(json.dumps(data))
    _saved_processor(head / "processor", "tiny")
    assert isinstance(export_processor(read_manifest(head)), Preprocessor)
    (head / "manifest.json").write_text(json.dumps(data | {PROCESSOR_READ_BY_TRANSFORMERS: "its input_ids differ"}))
    assert type(export_processor(read_manifest(head))).__name__ == "BridgeTowerProcessor"


def test_the_start_benchmark_times_both_readings_and_sees_torch_in_one(tiny_export: Path) -> None:
    done = run_benchmark(
        "processor_start.py", tiny_export, "--rounds", "2", "--iters", "2", "--batch", "2", timeout=600
    )
    assert re.findall(r"^round (\d)/2: btdeploy [\d.]+ s, transformers [\d.]+ s$", done.stderr, re.M) == ["1", "2"]
    starts = {row[0]: row for row in markdown_table(done.stdout, "reading")}
    assert starts["btdeploy"][4] == "no" and starts["transformers"][4] == "yes", starts
    for row in starts.values():
        wall, in_process, peak = map(float, row[1:4])
        assert 0 < in_process < wall and peak > 0, row
    # The peak of the process without torch is the smaller, by the 100s of MB torch brings.
    assert float(starts["transformers"][3]) - float(starts["btdeploy"][3]) > 100, starts
    ratio = float(re.search(r"transformers' start over btdeploy's: ([\d.]+)x", done.stdout)[1])  # type: ignore[index]
    assert abs(ratio - float(starts["transformers"][1]) / float(starts["btdeploy"][1])) < 0.02 * ratio + 0.01
    warm = markdown_tables(done.stdout, "reading")[1]
    assert [row[0] for row in warm] == ["btdeploy", "transformers"]
    assert all(0 < float(row[2]) <= float(row[1]) <= float(row[3]) for row in warm), warm
    assert not list(tiny_export.rglob("picture.png")), "the benchmark's picture was written into the export"


def test_doctor_names_a_processor_read_with_transformers_and_one_that_cannot_be_read(
    tmp_path: Path, tiny_export: Path
) -> None:
    import shutil

    from btdeploy.apps.doctor import doctor_report

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    clean = [line for line in doctor_report(export)[0] if line.strip().startswith("processor")]
    assert clean == [], clean  # every head read by btdeploy: nothing to say
    _edit_json(export / "itm" / "processor" / "processor_config.json",
               lambda d: d["image_processor"].update(do_convert_rgb=True))  # fmt: skip
    (export / "mlm" / "processor" / "tokenizer_config.json").write_text('{"cut": ')
    lines = doctor_report(export)[0]
    itm = lines.index(next(line for line in lines if line.startswith("  itm ")))
    assert lines[itm + 1] == (
        "        processor read with transformers, which imports torch: image processor settings do_convert_rgb"
    )
    mlm = lines.index(next(line for line in lines if line.startswith("  mlm ")))
    assert lines[mlm + 1].startswith(
        f"        processor: {export / 'mlm' / 'processor' / 'tokenizer_config.json'} is damaged ("
    ), lines[mlm + 1]
