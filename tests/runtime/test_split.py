"""Split towers: text, vision and fusion graphs that together equal the head, cached features,
and all-pairs scoring that runs each tower once per item."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_benchmark, spying

import btdeploy
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS
from btdeploy.model.inputs import sample_inputs
from btdeploy.optimize.optimizer import optimize_head
from btdeploy.quantize.quantizer import quantize_head
from btdeploy.runtime.runtime import Features
from btdeploy.verify.check import check_export


@pytest.fixture(scope="module", params=["tiny", "non-default"])
def split_export(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, non_default_checkpoint: Path
) -> Path:
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model

    source = resolve_model("tiny") if request.param == "tiny" else resolve_model(str(non_default_checkpoint), seed=3)
    out = tmp_path_factory.mktemp(f"split-{request.param}")
    export_heads(source, list(HEADS), out, split=True)
    for head in HEADS:
        optimize_head(out / head, "ort")
    return out


@pytest.mark.parametrize("flavour", [None, "ort"])
def test_split_heads_match_the_reference(split_export: Path, flavour: str | None) -> None:
    rows = check_export(split_export, batch_sizes=(1, 3), text_lengths=(2, 33), flavour=flavour, split=True)
    assert len(rows) == sum(len(h.outputs) for h in HEADS.values())
    for row in rows:
        assert row.passed, (row.head, row.output, row.stats.max_abs)


def test_split_heads_on_openvino_match_the_reference_and_onnx_runtime(split_export: Path) -> None:
    """OpenVINO runs the three split graphs as one backend: the heads pass `btdeploy check`, and its
    tower features and scores are ONNX Runtime's."""
    rows = check_export(split_export, batch_sizes=(1, 3), text_lengths=(2, 33), backend="openvino", split=True)
    assert len(rows) == sum(len(h.outputs) for h in HEADS.values())
    assert all(row.passed for row in rows), [(row.head, row.output, row.stats.max_abs) for row in rows]
    on_openvino = btdeploy.load(split_export, head="itm", backend="openvino", split=True)
    on_ort = btdeploy.load(split_export, head="itm", split=True)
    assert on_openvino.backend.name == "openvino-split" and on_ort.backend.name == "onnxruntime-split"
    images = sample_inputs(on_ort.config, 2, 4, seed=16)["pixel_values"]
    texts = sample_inputs(on_ort.config, 3, 7, seed=17)
    scores = [
        runtime.score(
            runtime.encode_images(images),
            runtime.encode_texts(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"]),
        )["logits"]
        for runtime in (on_openvino, on_ort)
    ]
    assert scores[0].shape == scores[1].shape == (2, 3, 2)
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("head", list(HEADS))
def test_split_equals_the_monolithic_graph(split_export: Path, head: str) -> None:
    whole = btdeploy.load(split_export, head=head, flavour="ort")
    split = btdeploy.load(split_export, head=head, flavour="ort", split=True)
    feeds = sample_inputs(whole.config, 3, 11, seed=5)
    expected, got = whole(**feeds), split(**feeds)
    for name in whole.head.output_names:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=0)
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())


def test_split_graphs_fuse_every_block(split_export: Path) -> None:
    from btdeploy.artifacts.manifest import read_manifest

    for head in HEADS:
        summary = read_manifest(split_export / head).data["optimized"]["ort"]
        parts = summary["parts"]
        assert set(parts) == {"text", "vision", "fusion"}
        total = sum(p["attention_fused"] for p in parts.values())
        assert total == summary["attention_fused"] == summary["attention_expected"], head
        for part in parts.values():
            assert (
                part["attention_fused"] == part["attention_expected"]
                and part["bridges_fused"] == part["bridges_expected"]
            )


@pytest.mark.parametrize("head", ["itm", "itc", "base"])
def test_score_over_3x4_equals_the_12_single_runs(split_export: Path, head: str) -> None:
    split = btdeploy.load(split_export, head=head, split=True)
    whole = btdeploy.load(split_export, head=head)
    images = sample_inputs(split.config, 3, 4, seed=6)["pixel_values"]
    texts = sample_inputs(split.config, 4, 9, seed=7)
    scores = split.score(
        split.encode_images(images),
        split.encode_texts(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"]),
        batch_size=5,
    )
    for name in whole.head.output_names:
        assert scores[name].shape[:2] == (3, 4)
    for i in range(3):
        for j in range(4):
            single = whole(
                input_ids=texts["input_ids"][j : j + 1],
                attention_mask=texts["attention_mask"][j : j + 1],
                pixel_values=images[i : i + 1],
            )
            for name in whole.head.output_names:
                np.testing.assert_allclose(scores[name][i, j], single[name][0], atol=1e-5, rtol=0)


def test_encode_texts_without_a_mask_attends_to_every_token(split_export: Path) -> None:
    split = btdeploy.load(split_export, head="itm", split=True)
    texts = sample_inputs(split.config, 3, 8, seed=9)  # padded rows: the mask matters
    assert not texts["attention_mask"].all()
    without = split.encode_texts(input_ids=texts["input_ids"])
    ones = split.encode_texts(input_ids=texts["input_ids"], attention_mask=np.ones((3, 8), np.int64))
    masked = split.encode_texts(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"])
    for name, values in without.arrays.items():
        np.testing.assert_array_equal(values, ones.arrays[name])
    assert not np.array_equal(without.arrays["text_states"], masked.arrays["text_states"])


def test_features_name_their_tower_by_its_recorded_hash_without_hashing_it_again(
    split_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tower's features carry its graph's sha256, as the manifest recorded it when the graph was
    written and held to its size on load: `rank` and `index` had hashed each tower graph again
    (0.3 s a base tower). A graph with no record is hashed, as before."""
    from btdeploy.artifacts import manifest as manifest_module
    from btdeploy.artifacts.onnx_files import graph_sha256

    folder = split_export / "itm"
    actual = graph_sha256(folder / "vision.onnx")
    hashed: list[Path] = []
    monkeypatch.setattr(manifest_module, "graph_sha256", spying(graph_sha256, hashed.append))
    pixels = sample_inputs(read_manifest(folder).config, 2, 5, seed=1)["pixel_values"]
    features = btdeploy.load(folder, split=True).encode_images(pixels)
    assert features.origin["graph_sha256"] == actual and hashed == []
    unrecorded = tmp_path / "itm"
    shutil.copytree(folder, unrecorded)
    data = json.loads((unrecorded / "manifest.json").read_text())
    del data["graphs"]["vision.onnx"]
    (unrecorded / "manifest.json").write_text(json.dumps(data))
    again = btdeploy.load(unrecorded, split=True).encode_images(pixels)
    assert again.origin["graph_sha256"] == actual and hashed == [unrecorded / "vision.onnx"]


def test_features_round_trip_bit_identical_and_refuse_strangers(
    split_export: Path, tiny_export: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "itm"
    shutil.copytree(split_export / "itm", folder)
    runtime = btdeploy.load(folder, split=True)
    feeds = sample_inputs(runtime.config, 2, 6, seed=8)
    images = runtime.encode_images(feeds["pixel_values"])
    texts = runtime.encode_texts(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"])
    images.save(tmp_path / "images.npz")
    texts.save(tmp_path / "texts.npz")
    loaded_images, loaded_texts = Features.load(tmp_path / "images.npz"), Features.load(tmp_path / "texts.npz")
    for original, loaded in ((images, loaded_images), (texts, loaded_texts)):
        assert original.kind == loaded.kind and original.origin == loaded.origin
        assert set(original.arrays) == set(loaded.arrays)
        for name, values in original.arrays.items():
            assert values.dtype == loaded.arrays[name].dtype and np.array_equal(values, loaded.arrays[name])
    np.testing.assert_array_equal(
        runtime.score(loaded_images, loaded_texts)["logits"], runtime.score(images, texts)["logits"]
    )
    # Another precision of the same checkpoint: the tower graphs differ.
    quantize_head(folder, "int8-dynamic", "ort")
    dynamic = btdeploy.load(folder, split=True, flavour="ort", precision="int8-dynamic")
    with pytest.raises(BtDeployError, match="image features were computed by vision.onnx .* vision.ort.int8-dynamic"):
        dynamic.score(loaded_images, loaded_texts)
    # Another checkpoint (the other fixture's config or seed): refused even at the same precision.
    other = tmp_path / "other"
    shutil.copytree(tiny_export / "itm", other / "itm")
    with pytest.raises(BtDeployError, match="has no split graphs: export with btdeploy export --split"):
        btdeploy.load(other, split=True)
    stranger = Features("image", images.arrays, {**images.origin, "config_sha256": "0" * 64})
    with pytest.raises(BtDeployError, match="another checkpoint, head or precision; encode them again"):
        runtime.score(stranger, texts)
    # Another head's vision tower: same file name and checkpoint, so the message shows both graph hashes.
    itc_images = btdeploy.load(split_export, head="itc", split=True).encode_images(feeds["pixel_values"])
    with pytest.raises(BtDeployError) as error:
        runtime.score(itc_images, texts)
    hashes = [itc_images.origin["graph_sha256"][:12], images.origin["graph_sha256"][:12]]
    assert hashes[0] != hashes[1] and all(f"vision.onnx (sha256 {h})" in str(error.value) for h in hashes)
    # Printing features shows their shapes and origin, not megabytes of values.
    shown = repr(images)
    assert shown.startswith("Features(image, 2 row(s): image_states float32 [2, ") and len(shown) < 300
    with pytest.raises(BtDeployError, match="expected text features .*, got image features: call score"):
        runtime.score(images, images)
    with pytest.raises(BtDeployError, match="expected image features .*, got ndarray"):
        runtime.score(feeds["pixel_values"], texts)  # type: ignore[arg-type]  # wrong on purpose
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(BtDeployError, match="is not a btdeploy features file"):
        Features.load(tmp_path / "junk.npz")


def test_features_encoded_in_parts_join_and_slice_to_the_same_scores(split_export: Path) -> None:
    """A gallery grown over several calls: joined parts score as one encode of everything, texts
    of different padded lengths included; rows picked by index, slice or list keep their scores."""
    for head in ("itm", "mlm"):
        runtime = btdeploy.load(split_export, head=head, split=True)
        images = sample_inputs(runtime.config, 4, 4, seed=10)["pixel_values"]
        short, long = (
            {k: v for k, v in sample_inputs(runtime.config, rows, length, seed=seed).items() if k != "pixel_values"}
            for rows, length, seed in ((2, 5, 11), (3, 9, 12))
        )
        whole_images = runtime.encode_images(images)
        joined_images = Features.concat([runtime.encode_images(images[:1]), runtime.encode_images(images[1:])])
        joined_texts = Features.concat(
            [runtime.encode_texts(short["input_ids"], short["attention_mask"]), runtime.encode_texts(long)]
        )
        assert len(joined_images) == 4 and len(joined_texts) == 5
        assert joined_texts.arrays["attention_mask"].shape == (5, 9)
        np.testing.assert_array_equal(joined_images.arrays["image_states"], whole_images.arrays["image_states"])
        scores = runtime.score(joined_images, joined_texts)
        for texts, columns in ((short, slice(0, 2)), (long, slice(2, 5))):
            alone = runtime.score(whole_images, runtime.encode_texts(texts))
            for name, values in alone.items():
                got = scores[name][:, columns]
                if head == "mlm":  # per-token logits: compare the tokens the short texts have
                    got = got[:, :, : values.shape[2]]
                np.testing.assert_allclose(got, values, atol=1e-5, rtol=0, err_msg=f"{head} {name}")
        # Rows taken back out of the join lose the padding no row of theirs attends to, as when
        # tokenized alone: the short texts' 5 columns, the second long text's first 3.
        short_again = joined_texts[:2].without_padding()
        assert short_again.arrays["attention_mask"].shape == (2, 5)
        np.testing.assert_array_equal(short_again.arrays["attention_mask"], short["attention_mask"])
        np.testing.assert_array_equal(short_again.arrays["text_states"], joined_texts.arrays["text_states"][:2, :, :5])
        assert joined_texts[[3, 1]].without_padding().arrays["attention_mask"].shape == (2, 3)
        assert joined_texts[2:].without_padding().arrays["attention_mask"].shape == (3, 9)
        assert whole_images.without_padding() is whole_images
        picked = [whole_images[3], whole_images[1:3], whole_images[[0, -1]]]
        assert [len(p) for p in picked] == [1, 2, 2] and len(list(whole_images)) == 4
        for part, rows in zip(picked, ([3], [1, 2], [0, 3]), strict=True):
            np.testing.assert_array_equal(
                runtime.score(part, joined_texts)["logits"], scores["logits"][rows], err_msg=f"{head} rows {rows}"
            )
    with pytest.raises(BtDeployError, match="row 4 is outside these 4 image features"):
        whole_images[4]
    with pytest.raises(BtDeployError, match=r"rows \[0, 7\] reach outside"):
        whole_images[[0, 7]]
    with pytest.raises(BtDeployError, match="nothing to score: 0 image"):
        runtime.score(whole_images[4:], joined_texts)
    # Another graph of the text tower: the fused one (two heads' plain text graphs may be the same
    # file byte for byte, as the dynamo exporter writes them, and then their features do join).
    fused_texts = btdeploy.load(split_export, head="itm", split=True, flavour="ort").encode_texts(short)
    with pytest.raises(
        BtDeployError, match=r"cannot join text features of text.onnx .* with text features of text\.ort\.onnx"
    ):
        Features.concat([joined_texts, fused_texts])
    with pytest.raises(BtDeployError, match="cannot join image features .* with text features"):
        Features.concat([whole_images, joined_texts])


def test_split_runtime_arguments_get_one_line_each(split_export: Path, tmp_path: Path) -> None:
    runtime = btdeploy.load(split_export, head="itm", split=True)
    feeds = sample_inputs(runtime.config, 2, 6, seed=13)
    for bad in (0, 2.5, True):
        with pytest.raises(BtDeployError, match=f"batch_size {bad!r} must be a whole number, at least 1"):
            runtime.encode_images(feeds["pixel_values"], batch_size=bad)  # type: ignore[arg-type]  # on purpose
    with pytest.raises(BtDeployError, match="input_ids holds text, not token ids: tokenize it first"):
        runtime.encode_texts(["a cat", "a dog"])
    with pytest.raises(BtDeployError, match="input_ids is empty"):
        runtime.encode_texts(feeds["input_ids"][:0], feeds["attention_mask"][:0])
    with pytest.raises(BtDeployError, match="absent.npz does not exist"):
        Features.load(tmp_path / "absent.npz")
    with pytest.raises(BtDeployError, match="is a folder: give a file name to write"):
        runtime.encode_images(feeds["pixel_values"]).save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_split_graphs_quantize_and_keep_the_floors(split_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "itm"
    shutil.copytree(split_export / "itm", folder)
    optimize_head(folder, "trt")
    quantize_head(folder, "int8", "ort", calib_size=4)
    for stem in ("model", "text", "vision", "fusion"):
        assert (folder / f"{stem}.ort.int8.onnx").is_file()
    rows = check_export(folder, precision="int8", flavour="ort", split=True)
    assert rows and all(row.passed for row in rows), [(r.output, r.stats.cosine) for r in rows]


def test_fusion_calibration_runs_the_towers_a_few_rows_at_a_time(
    split_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fusion graph's calibration inputs had come from one tower run over every row at once,
    all held while calibration read them one by one: they are the same, made TOWER_ROWS rows at a
    time and spooled to files when first read, one chunk held at a time, the files gone after."""
    import shutil

    from btdeploy.artifacts.graph_names import Flavour
    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.backends.split import SplitBackend
    from btdeploy.backends.targets import build_split
    from btdeploy.quantize import quantizer
    from btdeploy.quantize.calibration import load_calibration

    folder = tmp_path / "itc"  # its towers also give the head's own embeddings, which fusion does not read
    shutil.copytree(split_export / "itc", folder)
    manifest = read_manifest(folder)
    calibration = load_calibration(manifest, None, None, 7)
    towers = build_split(manifest, flavour="ort")
    whole = {**towers.text(calibration.feeds), **towers.vision(calibration.feeds)}
    monkeypatch.setattr(quantizer, "TOWER_ROWS", 3)
    runs: list[int] = []
    text, vision = SplitBackend.text, SplitBackend.vision
    monkeypatch.setattr(SplitBackend, "text", spying(text, lambda self, f: runs.append(len(f["input_ids"]))))
    monkeypatch.setattr(SplitBackend, "vision", spying(vision, lambda self, f: runs.append(len(f["pixel_values"]))))
    before = set(folder.iterdir())
    with quantizer._stem_rows(manifest, calibration, "fusion", Flavour.ORT) as rows:
        assert runs == [] and set(folder.iterdir()) == before  # nothing made before it is read
        assert len(rows) == 7 and runs == [] and set(folder.iterdir()) == before  # nor by counting them
        read = [rows.take(index, index + 1) for index in range(len(rows))]  # as calibration reads them
        assert runs == [3, 3, 3, 3, 1, 1]  # every chunk made once, at the first read, then spooled
        spooled = set(folder.iterdir()) - before
        assert len(spooled) == 1 and next(iter(spooled)).name.endswith(".partial")
        across = rows.take(2, 6)  # rows from three chunks at once (AutoCast reads its first rows so)
        assert runs == [3, 3, 3, 3, 1, 1]  # reading makes nothing again
    assert set(folder.iterdir()) == before  # the spooled rows are gone with the step
    assert set(read[0]) == set(manifest.input_names("fusion")) < set(whole)
    for name in manifest.input_names("fusion"):
        values = whole[name]
        np.testing.assert_allclose(np.concatenate([row[name] for row in read]), values, rtol=0, atol=1e-5)
        np.testing.assert_allclose(across[name], values[2:6], rtol=0, atol=1e-5)


def _rank_inputs(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, size=(60, 70, 3), dtype=np.uint8)).save(images / f"img{index}.png")
    captions = ["a cat on a sofa", "two dogs in the snow", "a red car", "the sea at night", "a bowl of soup"]
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(captions) + "\n")
    return images, texts, captions


def test_rank_one_image_against_captions(
    split_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.apps.rank import rank
    from btdeploy.cli import main
    from btdeploy.model.media import export_processor, load_image

    images, texts, captions = _rank_inputs(tmp_path)
    image = images / "img0.png"
    assert main(["rank", str(split_export), "--image", str(image), "--texts", str(texts), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "ITC cosine over 5, top 3 to ITM; ITM on 3 (split graphs, the itc towers' features)" in printed
    rows = rank(split_export, [image], captions, top_k=3).rows
    table = [line.split(maxsplit=3)[3] for line in printed.splitlines()[3:]]
    assert len(rows) == 3 and [r.label for r in rows] == table
    probabilities = [p for r in rows if (p := r.itm_probability) is not None]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    # The ITC stage kept the three best cosines; ITM probabilities equal the whole head's.
    cosines = sorted((c for r in rows if (c := r.itc_cosine) is not None), reverse=True)
    assert len(cosines) == 3
    whole_itc = btdeploy.load(split_export, head="itc")
    processor = export_processor(whole_itc.manifest)
    encoding = processor([load_image(image)] * 5, captions, padding=True, return_tensors="np")
    out = whole_itc(**encoding)
    all_cosines = sorted((out.text_embeds * out.image_embeds).sum(-1).tolist(), reverse=True)
    np.testing.assert_allclose(cosines, all_cosines[:3], atol=1e-5)
    whole_itm = btdeploy.load(split_export, head="itm")
    chosen = [r.label for r in rows]
    logits = whole_itm(**processor([load_image(image)] * 3, chosen, padding=True, return_tensors="np")).logits
    expected = np.exp(logits[:, 1]) / np.exp(logits).sum(-1)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    # --json: the same rows, each with its line in the captions file, and the run's stages.
    assert (
        main(["rank", str(split_export), "--image", str(image), "--texts", str(texts), "--top-k", "3", "--json"]) == 0
    )
    printed_json = json.loads(capsys.readouterr().out)
    assert printed_json["query"] == "image" and printed_json["stages"] in printed
    ranking = printed_json["ranking"]
    assert [row["item"] for row in ranking] == table
    assert [captions[row["index"]] for row in ranking] == table
    np.testing.assert_allclose([row["match_probability"] for row in ranking], expected, atol=1e-5)
    cosines_in_order = [c for r in rows if (c := r.itc_cosine) is not None]
    np.testing.assert_allclose([row["itc_cosine"] for row in ranking], cosines_in_order, atol=1e-6)


def test_rank_and_index_open_only_the_graphs_they_run(
    split_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Split graphs open on their first use: a ranking runs the itc head's towers and the itm
    head's fusion graph (the towers are shared), `index` one tower; a damaged graph is still
    refused at load."""
    import btdeploy.backends.onnxruntime as onnxruntime_backend
    from btdeploy.apps.gallery import index_images
    from btdeploy.apps.rank import rank

    opened: list[str] = []
    real = onnxruntime_backend.open_recorded_graph
    spy = spying(real, lambda manifest, path, *rest, **options: opened.append(f"{path.parent.name}/{path.name}"))
    monkeypatch.setattr(onnxruntime_backend, "open_recorded_graph", spy)
    images, _, captions = _rank_inputs(tmp_path)
    ranking = rank(split_export, [images / "img0.png"], captions, top_k=2)
    assert len(ranking.rows) == 2 and ranking.stages.endswith("ITM on 2 (split graphs, the itc towers' features)")
    assert sorted(opened) == ["itc/text.onnx", "itc/vision.onnx", "itm/fusion.onnx"]
    opened.clear()
    index_images(split_export, images, tmp_path / "gallery.npz")
    assert opened == ["itc/vision.onnx"]
    runtime = btdeploy.load(split_export, head="itc", split=True)
    assert runtime.backend.parts == {}  # nothing opened before a call
    damaged = tmp_path / "damaged"
    shutil.copytree(split_export / "itc", damaged)
    with (damaged / "fusion.onnx").open("ab") as graph:
        graph.write(b"\0")
    with pytest.raises(BtDeployError, match=r"fusion.onnx is not the graph its manifest recorded \(\d+ bytes"):
        btdeploy.load(damaged, split=True)


def test_rank_scores_the_itc_towers_features_as_the_itm_towers_own(split_export: Path, tmp_path: Path) -> None:
    """FP32 heads of one checkpoint share their towers: their states agree, and ITM scores the
    features the ITC stage kept; where more candidates reach ITM than one batch holds, the itc
    towers run again on them, to the same ranking, images against a caption and captions against
    an image. A quantized or whole itc head shares nothing."""
    from btdeploy.apps.rank import Ranker, rank

    images, _, captions = _rank_inputs(tmp_path)
    files = sorted(images.iterdir())
    queries: list[tuple[list[Path], list[str]]] = [(files, [captions[1]]), ([files[0]], captions)]
    # (top K, a batch where the K are kept, one where they are not): (2, 2, 1) keeps the best
    # over three batches of candidates.
    for (pictures, texts), (top_k, kept, not_kept) in itertools.product(queries, [(3, 64, 2), (2, 2, 1)]):
        shared = rank(split_export, pictures, texts, top_k=top_k, batch_size=kept)
        again = rank(split_export, pictures, texts, top_k=top_k, batch_size=not_kept)
        assert shared.stages.endswith(f"ITM on {top_k} (split graphs, the itc towers' features)")
        assert again.stages == shared.stages  # the itc towers run again on the candidates ITM scores
        assert [(r.label, r.index) for r in shared.rows] == [(r.label, r.index) for r in again.rows]
        for mine, theirs in zip(shared.rows, again.rows, strict=True):
            assert abs(mine.itm_probability - theirs.itm_probability) <= 1e-6  # type: ignore[operator]
            assert abs(mine.itc_cosine - theirs.itc_cosine) <= 1e-6  # type: ignore[operator]
    itm, itc = (btdeploy.load(split_export, head=head, split=True) for head in ("itm", "itc"))
    feeds = sample_inputs(itm.config, 2, 7, seed=21)
    pixels, ids, mask = feeds["pixel_values"], feeds["input_ids"], feeds["attention_mask"]
    of_itc, of_itm = ((runtime.encode_images(pixels), runtime.encode_texts(ids, mask)) for runtime in (itc, itm))
    for side, states in enumerate(("image_states", "text_states")):
        np.testing.assert_allclose(of_itc[side].arrays[states], of_itm[side].arrays[states], rtol=0, atol=1e-6)
    assert Ranker(itm, itc).shares_towers
    assert not Ranker(itm, btdeploy.load(split_export, head="itc")).shares_towers  # the whole itc graph
    quantized = tmp_path / "quantized"
    shutil.copytree(split_export / "itc", quantized)
    quantize_head(quantized, "int8-dynamic", "ort")
    assert not Ranker(itm, btdeploy.load(quantized, split=True, flavour="ort", precision="int8-dynamic")).shares_towers


def test_rank_images_against_one_caption_and_bad_arguments(
    split_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.cli import main

    images, texts, _ = _rank_inputs(tmp_path)
    assert main(["rank", str(split_export), "--images", str(images), "--text", "a red car", "--top-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert sorted(line.split()[-1] for line in printed.splitlines()[3:]) == ["img0.png", "img1.png", "img2.png"]
    assert main(["rank", str(split_export), "--image", str(images / "img0.png"), "--images", str(images)]) == 2
    assert (
        "give --image IMG with --texts FILE, or --images DIR with --text TEXT, or --gallery" in capsys.readouterr().err
    )
    assert main(["rank", str(split_export), "--image", str(images / "img0.png"), "--texts", "/nope.txt"]) == 2
    assert "--texts /nope.txt is not a file" in capsys.readouterr().err


def test_rank_runs_the_quantized_graphs_it_is_given(
    split_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.apps.rank import rank
    from btdeploy.cli import main
    from btdeploy.quantize.quantizer import quantize_head

    out = tmp_path / "out"
    for head in ("itc", "itm"):
        shutil.copytree(split_export / head, out / head)
        quantize_head(out / head, "int8-dynamic", "ort")
    images, texts, captions = _rank_inputs(tmp_path)
    image = images / "img0.png"
    argv = ["rank", str(out), "--image", str(image), "--texts", str(texts), "--top-k", "5"]
    assert main([*argv, "--precision", "int8-dynamic"]) == 0
    printed = capsys.readouterr().out
    assert "ITC cosine over 5 (ort int8-dynamic), top 5 to ITM; ITM on 5 (split graphs, ort int8-dynamic)" in printed
    fp32 = {r.label: r.itm_probability for r in rank(out, [image], captions, top_k=5).rows}
    int8 = {r.label: r.itm_probability for r in rank(out, [image], captions, 5, {"precision": "int8-dynamic"}).rows}
    assert set(int8) == set(fp32) and max(abs(int8[k] - fp32[k]) for k in fp32) <= 0.05  # type: ignore[operator]
    (out / "itm" / "fusion.ort.int8-dynamic.onnx").unlink()  # it reads those graphs, or says which is missing
    assert main([*argv, "--precision", "int8-dynamic"]) == 2
    assert "fusion.ort.int8-dynamic.onnx does not exist" in capsys.readouterr().err


def test_rank_on_openvino_orders_as_onnx_runtime_does(
    split_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.apps.rank import rank
    from btdeploy.cli import main

    images, texts, captions = _rank_inputs(tmp_path)
    image = images / "img0.png"
    argv = ["rank", str(split_export), "--image", str(image), "--texts", str(texts), "--top-k", "3"]
    assert main([*argv, "--backend", "openvino"]) == 0
    stages = "ITC cosine over 5 (openvino), top 3 to ITM; ITM on 3 (split graphs, openvino, the itc towers' features)"
    assert stages in capsys.readouterr().out
    ort = rank(split_export, [image], captions, top_k=5).rows
    openvino = rank(split_export, [image], captions, top_k=5, backend="openvino").rows
    assert [row.label for row in openvino] == [row.label for row in ort]
    for mine, theirs in zip(openvino, ort, strict=True):
        assert abs(mine.itm_probability - theirs.itm_probability) <= 1e-5  # type: ignore[operator]
        assert abs(mine.itc_cosine - theirs.itc_cosine) <= 1e-5  # type: ignore[operator]
    assert main([*argv, "--backend", "openvino", "--no-exact-sums"]) == 2  # ONNX Runtime's option
    assert "the openvino backend" in capsys.readouterr().err


def test_rank_workload_bench_writes_split_and_monolithic(split_export: Path, tmp_path: Path) -> None:
    from btdeploy.bench.rank_workload import run_rank_bench

    cases = run_rank_bench(split_export, 6, 12, warmup=1, iters=2, threads=1, out=tmp_path)
    kinds = {(c.variant, c.kind) for c in cases}
    assert kinds == {(v, k) for v in ("ort", "ort-fused") for k in ("monolithic", "split")}  # no quantized graphs
    assert all(len(c.samples_s) == 2 and c.median_ms > 0 for c in cases)
    table = (tmp_path / "rank.md").read_text()
    assert "| ort |" in table and "| ort-fused |" in table and (tmp_path / "rank.png").stat().st_size > 0
    from btdeploy.bench.machine import cpu_description

    # Every report names the instruction sets its times depend on, as the heads bench does.
    assert f"logical cores; flags: {', '.join(cpu_description()['flags'])})" in table


def test_rank_workload_bench_times_openvino_by_name(
    split_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenVINO runs the split towers too: named, its variant is timed beside ONNX Runtime's, and
    each variant's split towers give its whole head's scores; every run and variant shows progress."""
    from btdeploy.bench.rank_workload import run_rank_bench

    cases = run_rank_bench(
        split_export, 5, 9, warmup=0, iters=1, threads=1, out=tmp_path, variants=["openvino-fp32", "ort"]
    )
    assert [(c.variant, c.kind) for c in cases] == [
        (v, k) for v in ("openvino-fp32", "ort") for k in ("monolithic", "split")
    ]
    report = json.loads((tmp_path / "rank.json").read_text())
    assert report["split_vs_whole_max_abs"].keys() == {"openvino-fp32", "ort"}
    assert all(value <= 1e-4 for value in report["split_vs_whole_max_abs"].values()), report
    assert "| openvino-fp32 |" in (tmp_path / "rank.md").read_text()
    said = capsys.readouterr().err
    # The check run and one timed run of each way: 4 runs a variant, the last always said.
    assert "bench rank openvino-fp32: runs: 4/4" in said and "bench rank ort: runs: 4/4" in said
    assert re.search(r"bench rank \[1/2\] openvino-fp32: monolithic [\d.]+ ms, split .* left", said), said
    assert "bench rank [2/2] ort: monolithic" in said


@pytest.mark.parametrize(("variants", "message"), [
    (["ort-fuzed"], "unknown variant 'ort-fuzed' (rank runs ort, ort-fused, trt-graph,"),
    (["torch-eager"], "torch-eager runs on torch, which has no split towers (rank runs ort,"),
    # Named but not made: every problem at once, each with the command that makes its graph.
    (["ort-int8-dynamic", "openvino-int8"], "model.ort.int8-dynamic.onnx does not exist: run btdeploy quantize"),
])  # fmt: skip
def test_rank_workload_bench_refuses_what_it_cannot_time_in_one_line(
    split_export: Path, tmp_path: Path, variants: list[str], message: str
) -> None:
    from btdeploy.bench.rank_workload import run_rank_bench

    with pytest.raises(BtDeployError, match=re.escape(message)) as refused:
        run_rank_bench(split_export, 2, 4, warmup=0, iters=1, threads=1, out=tmp_path, variants=variants)
    assert "\n" not in str(refused.value) and not (tmp_path / "rank.md").exists()
    if len(variants) == 2:
        assert "; openvino-int8: " in str(refused.value) and "--flavour trt --precision int8" in str(refused.value)


def test_split_spin_benchmark_sets_the_option_sets_side_by_side(split_export: Path) -> None:
    # benchmarks/split_spin.py times the split runtime in child processes under ONNX Runtime's
    # default session options and under btdeploy's; btdeploy's leave the cores idle after a run.
    import re

    done = run_benchmark("split_spin.py", split_export / "itm", "--rounds", 1, "--runs", 2, "--threads", 2)
    lines = done.stdout.splitlines()
    row = re.compile(r"\| (\S+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|")
    rows = {m.group(1): m for line in lines if (m := row.match(line))}
    assert set(rows) == {"onnxruntime-default", "btdeploy"}, lines
    assert all(float(m.group(2)) > 0 and float(m.group(3)) > 0 for m in rows.values())
    assert float(rows["btdeploy"].group(4)) < 5.0, lines
    assert re.search(r"default / btdeploy, per round: [\d.]+x \(median [\d.]+x\)", lines[-1]), lines[-1]
