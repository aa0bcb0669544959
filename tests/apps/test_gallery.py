"""`btdeploy index` and `rank --gallery`: the stored ITC embeddings rank as the folder itself does,
indexing again runs the vision tower on new and changed images only, and every fault is one line."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import spying
from PIL import Image

from btdeploy.errors import BtDeployError

CAPTION = "a red car by the sea"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, private_cache: Path) -> Path:
    """Tiny itc and itm with their split towers, also optimized (another vision graph)."""
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.optimize.optimizer import optimize_head

    out = tmp_path_factory.mktemp("gallery-export")
    export_heads(resolve_model("tiny"), ["itc", "itm"], out, split=True)
    for head in ("itc", "itm"):
        optimize_head(out / head, "ort")
    return out


def _photo(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(50 + seed, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _photos(folder: Path, seeds: range) -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [_photo(folder / f"photo{seed:02d}.png", seed) for seed in seeds]


def _vision_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many images each run of a split runtime's vision tower took."""
    from btdeploy.runtime.runtime import SplitRuntime

    rows: list[int] = []
    real = SplitRuntime.encode_images
    monkeypatch.setattr(
        SplitRuntime, "encode_images", spying(real, lambda runtime, pixels, *a, **k: rows.append(len(pixels)))
    )
    return rows


def test_the_gallery_ranks_as_the_folder_does(export: Path, tmp_path: Path) -> None:
    import btdeploy
    from btdeploy.apps.gallery import Gallery, index_images, rank_gallery
    from btdeploy.apps.rank import rank

    files = _photos(tmp_path / "photos", range(9))
    report = index_images(export, tmp_path / "photos", tmp_path / "gallery.npz", batch_size=4)
    assert (report.encoded, report.reused, report.dropped) == (9, 0, 0)
    gallery = Gallery.load(tmp_path / "gallery.npz")
    assert gallery.names == [path.name for path in files] and gallery.folder == (tmp_path / "photos").resolve()
    # The stored rows are the itc vision tower's embeddings of each image.
    itc = btdeploy.load(export, head="itc", split=True)
    from btdeploy.model.media import export_processor, image_inputs, load_image

    processor = export_processor(itc.manifest)
    expected = itc.encode_images(image_inputs(processor, [load_image(path) for path in files])).arrays["image_embeds"]
    np.testing.assert_allclose(gallery.embeddings, expected, rtol=0, atol=1e-6)
    stored = rank_gallery(export, tmp_path / "gallery.npz", CAPTION, top_k=3, batch_size=4)
    direct = rank(export, files, [CAPTION], top_k=3, batch_size=4)
    assert (
        stored.stages
        == direct.stages
        == "ITC cosine over 9, top 3 to ITM; ITM on 3 (split graphs, the itc towers' features)"
    )
    assert [(row.label, row.index) for row in stored.rows] == [(row.label, row.index) for row in direct.rows]
    for mine, theirs in zip(stored.rows, direct.rows, strict=True):
        assert abs(mine.itc_cosine - theirs.itc_cosine) <= 1e-6  # type: ignore[operator]
        assert abs(mine.itm_probability - theirs.itm_probability) <= 1e-6  # type: ignore[operator]
    # The same graphs on OpenVINO rank from the gallery ONNX Runtime indexed (its origin is the graph's).
    openvino = rank_gallery(export, tmp_path / "gallery.npz", CAPTION, top_k=3, backend="openvino")
    assert [row.index for row in openvino.rows] == [row.index for row in stored.rows]
    for mine, theirs in zip(openvino.rows, stored.rows, strict=True):
        assert abs(mine.itm_probability - theirs.itm_probability) <= 1e-5  # type: ignore[operator]


def test_indexing_again_runs_the_tower_on_new_and_changed_images_only(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from btdeploy.apps.gallery import Gallery, index_images

    folder, out = tmp_path / "photos", tmp_path / "gallery.npz"
    files = _photos(folder, range(6))
    index_images(export, folder, out)
    before = Gallery.load(out)
    files[1].unlink()  # gone
    _photo(files[2], 40)  # changed in place
    _photo(folder / "photo99.png", 99)  # new
    rows = _vision_rows(monkeypatch)
    report = index_images(export, folder, out)
    assert (report.encoded, report.reused, report.dropped) == (2, 4, 2)
    assert rows == [2]  # one run of the vision tower, on the changed and the new image
    after = Gallery.load(out)
    assert after.names == ["photo00.png", "photo02.png", "photo03.png", "photo04.png", "photo05.png", "photo99.png"]
    for name in ("photo00.png", "photo03.png", "photo04.png", "photo05.png"):
        assert np.array_equal(after.embeddings[after.names.index(name)], before.embeddings[before.names.index(name)])
    changed = after.embeddings[after.names.index("photo02.png")]
    assert not np.allclose(changed, before.embeddings[before.names.index("photo02.png")], atol=1e-3)
    rows.clear()
    assert index_images(export, folder, out).encoded == 0 and rows == []  # nothing new: no tower run


def test_a_gallery_of_another_graph_is_refused_and_indexed_anew(export: Path, tmp_path: Path) -> None:
    from btdeploy.apps.gallery import index_images, rank_gallery

    folder, out = tmp_path / "photos", tmp_path / "gallery.npz"
    _photos(folder, range(3))
    index_images(export, folder, out)
    refusal = r"gallery.npz was indexed with vision.onnx, this rank runs vision.ort.onnx"
    with pytest.raises(BtDeployError, match=refusal):
        rank_gallery(export, out, CAPTION, options={"flavour": "ort"})
    report = index_images(export, folder, out, {"flavour": "ort"})
    assert (report.encoded, report.reused, report.gallery.origin["graph"]) == (3, 0, "vision.ort.onnx")
    assert len(rank_gallery(export, out, CAPTION, top_k=2, options={"flavour": "ort"}).rows) == 2


def test_an_image_changed_or_gone_since_indexing_is_named(export: Path, tmp_path: Path) -> None:
    from btdeploy.apps.gallery import index_images, rank_gallery

    folder, out = tmp_path / "photos", tmp_path / "gallery.npz"
    files = _photos(folder, range(4))
    index_images(export, folder, out)
    _photo(files[0], 50)
    _photo(files[0], 0)  # the same bytes again: still the indexed image
    assert len(rank_gallery(export, out, CAPTION, top_k=4).rows) == 4
    _photo(files[3], 51)
    with pytest.raises(BtDeployError, match=rf"{files[3]} changed since .*gallery.npz was indexed: run btdeploy index"):
        rank_gallery(export, out, CAPTION, top_k=4)
    files[3].unlink()
    with pytest.raises(BtDeployError, match=rf"{files[3]} is gone since .*gallery.npz was indexed"):
        rank_gallery(export, out, CAPTION, top_k=4)


def test_an_unreadable_image_is_refused_before_any_embedding(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By its header while the folder is hashed, where decoding its batch had refused it after the
    embeddings of every image before it, all of them lost."""
    import btdeploy.apps.gallery
    from btdeploy.apps.gallery import index_images, index_texts, rank_gallery

    folder, out = tmp_path / "photos", tmp_path / "gallery.npz"
    _photos(folder, range(3))
    (folder / "photo03.png").write_bytes(b"a note, not a picture")
    embedded = _vision_rows(monkeypatch)
    with pytest.raises(BtDeployError, match=r"photo03.png cannot be read \(cannot identify image file"):
        index_images(export, folder, out)
    assert embedded == [] and not out.exists()
    # A query image for a gallery of captions is read before the heads load.
    captions = tmp_path / "captions.txt"
    captions.write_text(f"{CAPTION}\na red square\n")
    index_texts(export, captions, out)
    monkeypatch.setattr(btdeploy.apps.gallery, "rank", lambda *args, **kwargs: pytest.fail("ranked"))
    with pytest.raises(BtDeployError, match=r"photo03.png cannot be read"):
        rank_gallery(export, out, folder / "photo03.png")


def test_index_keeps_what_it_did_not_make(export: Path, tmp_path: Path) -> None:
    """A file at --out that is not a gallery is refused, not overwritten; a failure midway leaves
    the gallery there as it was, and no half-written file."""
    from btdeploy.apps.gallery import index_images

    folder = tmp_path / "photos"
    _photos(folder, range(3))
    other = tmp_path / "notes.npz"
    other.write_bytes(b"someone else's file")
    with pytest.raises(BtDeployError, match=r"--out .*notes.npz is not a btdeploy gallery .*: give another --out"):
        index_images(export, folder, other)
    assert other.read_bytes() == b"someone else's file"
    with pytest.raises(BtDeployError, match=r"is a folder: give the gallery's file name"):
        index_images(export, folder, folder)
    out = tmp_path / "gallery.npz"
    index_images(export, folder, out)
    kept = out.read_bytes()
    (folder / "photo09.png").write_bytes(b"not a png")
    with pytest.raises(BtDeployError, match="photo09.png"):
        index_images(export, folder, out)
    assert out.read_bytes() == kept
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gallery.npz", "notes.npz", "photos"]


def test_gallery_refusals_name_what_to_do(
    export: Path, tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.cli import main

    folder = tmp_path / "photos"
    _photos(folder, range(2))
    whole = tmp_path / "whole"
    shutil.copytree(export / "itm", whole / "itm")
    cases: list[tuple[list[str], str]] = [
        (["index", str(whole), "--images", str(folder), "--out", "g.npz"], "index needs the itc head: "),
        (["rank", str(whole), "--gallery", "g.npz", "--text", "a"], "rank --gallery needs the itc head: "),
        (["index", str(tiny_export), "--images", str(folder), "--out", "g.npz"], "index needs the itc head's split"),
        (["rank", str(tiny_export), "--gallery", "g.npz", "--text", "a"], "rank --gallery needs the itc head's split"),
        (["rank", str(export), "--gallery", str(tmp_path / "none.npz"), "--text", "a"], "does not exist: make it with"),
        (
            ["rank", str(export), "--gallery", "g.npz", "--texts", "t.txt"],
            "--texts goes with --image IMG; with --gallery",
        ),
        (["rank", str(export), "--gallery", "g.npz", "--images", str(folder), "--text", "a"], "--images goes with"),
        (["rank", str(export), "--gallery", "g.npz"], "--gallery needs --text TEXT or --image IMG"),
        (["rank", str(export), "--images", str(folder), "--image", "x.png"], "--image does not go with --images"),
        (["index", str(export), "--images", str(folder), "--texts", "t.txt", "--out", "g.npz"], "not both"),
        (["index", str(export), "--out", "g.npz"], "give --images DIR (a gallery of images) or --texts FILE"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_index_and_rank_gallery_from_the_command_line(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from btdeploy.cli import main

    folder, out = tmp_path / "photos", tmp_path / "gallery.npz"
    _photos(folder, range(5))
    assert main(["index", str(export), "--images", str(folder), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "5 image(s) in" in captured.out and "(5 encoded, 0 reused, 0 dropped)" in captured.out
    assert "index: vision tower on 5 image(s)" in captured.err  # progress
    assert main(["rank", str(export), "--gallery", str(out), "--text", CAPTION, "--top-k", "2", "--json"]) == 0
    printed: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert printed["query"] == "text" and len(printed["ranking"]) == 2
    assert all(row["item"] == f"photo{row['index']:02d}.png" for row in printed["ranking"])


def test_the_gallery_bench_times_both_ways_and_checks_they_agree(export: Path, tmp_path: Path) -> None:
    from conftest import is_quotient_of_printed, markdown_table, run_benchmark

    arguments = ["--sizes", "3,6", "--labels", "8", "--top-k", 2, "--rounds", 2, "--out", tmp_path]
    done = run_benchmark("gallery_rank.py", export, *arguments)
    rows = markdown_table(done.stdout, "gallery of")
    assert [row[:2] for row in rows] == [["images", "3"], ["images", "6"], ["captions", "8"]]
    for row in rows:
        index_s, direct_s, gallery_s = (float(cell) for cell in row[2:5])
        assert min(index_s, direct_s, gallery_s) > 0
        speedup = float(row[5].rstrip("x"))
        assert is_quotient_of_printed(speedup, direct_s, gallery_s, 0.05, half_digit=0.0005)
    assert "flags: " in done.stdout and (tmp_path / "results.md").read_text().strip() in done.stdout
    assert (tmp_path / "gallery_rank.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(Path(tempfile.gettempdir()).glob("btdeploy-gallery-*"))  # its photos removed


def test_serve_checks_its_gallery_before_ray_starts(export: Path, tmp_path: Path) -> None:
    """`serve --gallery`: refused in one line where /v1/search could not rank it, before Ray starts."""
    from btdeploy.apps.gallery import index_images
    from btdeploy.artifacts.manifest import head_folders, read_manifest
    from btdeploy.serve.settings import ServeSettings, check_gallery

    folder, out = tmp_path / "photos", tmp_path / "gallery.npz"
    _photos(folder, range(2))
    index_images(export, folder, out)
    manifests = {m.head: m for m in map(read_manifest, head_folders(export))}
    check_gallery(ServeSettings(export_dir=str(export), gallery=str(out)), manifests)  # as made: taken
    check_gallery(ServeSettings(export_dir=str(export), gallery=str(out), backend="openvino"), manifests)
    refusals = [
        (
            ServeSettings(export_dir=str(export), gallery=str(out), flavour="ort"),
            manifests,
            "this server runs vision.ort",
        ),
        (
            ServeSettings(export_dir=str(export), gallery=str(out)),
            {"itm": manifests["itm"]},
            "needs the itc head's split",
        ),
        (
            ServeSettings(export_dir=str(export), gallery=str(out)),
            {"itc": manifests["itc"]},
            "the itm head is not served",
        ),
        (ServeSettings(export_dir=str(export), gallery=str(tmp_path / "no.npz")), manifests, "no.npz does not exist"),
    ]
    for settings, served, message in refusals:
        with pytest.raises(BtDeployError, match=message):
            check_gallery(settings, served)
    folder.rename(tmp_path / "moved")
    with pytest.raises(BtDeployError, match=r"indexes .*photos, which is not a folder here"):
        check_gallery(ServeSettings(export_dir=str(export), gallery=str(out)), manifests)


LABELS = ["a red car", "a bowl of fruit", "two dogs in the snow", "a man riding a horse", "the sea at night"]


def _labels(folder: Path) -> tuple[Path, Path]:
    """A captions file of LABELS, and where its gallery goes."""
    labels = folder / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return labels, folder / "labels.npz"


def test_a_gallery_of_captions_ranks_as_the_captions_file_does(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels indexed once: an image is ranked against them without the text tower on each label."""
    from btdeploy.apps.gallery import Gallery, index_texts, rank_gallery
    from btdeploy.apps.rank import rank
    from btdeploy.runtime.runtime import SplitRuntime

    labels, out = _labels(tmp_path)
    report = index_texts(export, labels, out)
    assert (report.encoded, report.gallery.kind, report.gallery.names) == (5, "text", LABELS)
    image = _photo(tmp_path / "query.png", 7)
    texts: list[int] = []
    real = SplitRuntime.encode_texts
    monkeypatch.setattr(
        SplitRuntime, "encode_texts", spying(real, lambda rt, enc, *a, **k: texts.append(len(enc["input_ids"])))
    )
    stored = rank_gallery(export, out, image, top_k=2)
    assert texts == [2]  # the text tower ran on the two labels ITM scores, not on all five
    direct = rank(export, [image], LABELS, top_k=2)
    assert (
        stored.stages
        == direct.stages
        == "ITC cosine over 5, top 2 to ITM; ITM on 2 (split graphs, the itc towers' features)"
    )
    assert [(r.label, r.index) for r in stored.rows] == [(r.label, r.index) for r in direct.rows]
    for mine, theirs in zip(stored.rows, direct.rows, strict=True):
        assert abs(mine.itc_cosine - theirs.itc_cosine) <= 1e-6  # type: ignore[operator]
        assert abs(mine.itm_probability - theirs.itm_probability) <= 1e-6  # type: ignore[operator]
    # Labels added and removed: only the new ones run the tower; the kinds are not mixed.
    labels.write_text("\n".join([*LABELS[1:], "a yellow taxi"]) + "\n")
    again = index_texts(export, labels, out)
    assert (again.encoded, again.reused, again.dropped) == (1, 4, 1)
    assert np.array_equal(Gallery.load(out).embeddings[:4], report.gallery.embeddings[1:])
    labels.write_text("\n".join([*LABELS[1:], "a yellow taxi", LABELS[1]]) + "\n")  # a label twice
    twice = index_texts(export, labels, out)
    assert (twice.encoded, twice.reused, twice.dropped, len(twice.gallery.names)) == (0, 6, 0, 6)
    with pytest.raises(BtDeployError, match=r"labels.npz holds texts: rank it against --image IMG"):
        rank_gallery(export, out, "a caption")
    with pytest.raises(BtDeployError, match=r"is a gallery of texts, this index makes one of images"):
        from btdeploy.apps.gallery import index_images

        _photos(tmp_path / "photos", range(2))
        index_images(export, tmp_path / "photos", out)


def test_the_rank_replica_searches_a_gallery_of_captions_with_a_request_image(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/search of a caption gallery: the request's image against the stored labels, as rank --gallery does."""
    from types import SimpleNamespace

    from btdeploy.apps.gallery import index_texts, rank_gallery
    from btdeploy.serve import app
    from btdeploy.serve.settings import ServeSettings, check_gallery

    labels, out = _labels(tmp_path)
    index_texts(export, labels, out)
    settings = ServeSettings(export_dir=str(export), gallery=str(out))
    from btdeploy.artifacts.manifest import head_folders, read_manifest

    check_gallery(settings, {m.head: m for m in map(read_manifest, head_folders(export))})
    monkeypatch.setattr(app, "collector", lambda: SimpleNamespace(record_batch=SimpleNamespace(remote=print)))
    arguments = app.rank_model_arguments(settings, str(export / "itm"), str(export / "itc"))
    replica = app.RankModel.func_or_class(*arguments)  # type: ignore[attr-defined]
    image = _photo(tmp_path / "query.png", 8)
    answer = replica._search([image.read_bytes()], [], 3)
    expected = rank_gallery(export, out, image, top_k=3)
    assert answer["query"] == "image" and answer["stages"] == expected.stages
    assert [(r["item"], r["index"]) for r in answer["ranking"]] == [(r.label, r.index) for r in expected.rows]
    for mine, theirs in zip(answer["ranking"], expected.rows, strict=True):
        assert abs(mine["match_probability"] - theirs.itm_probability) <= 1e-6


def test_a_running_rank_replica_searches_the_gallery_index_replaced(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve --gallery: images indexed after the replica started are searched without a restart;
    a gallery the replica cannot search is a 503 that says what to do, and mending the file mends it."""
    from types import SimpleNamespace

    from btdeploy.apps.gallery import index_images, index_texts, rank_gallery
    from btdeploy.serve import app
    from btdeploy.serve.settings import ServeSettings

    folder, out = tmp_path / "photos", tmp_path / "gallery.npz"
    files = _photos(folder, range(3))
    index_images(export, folder, out)
    monkeypatch.setattr(app, "collector", lambda: SimpleNamespace(record_batch=SimpleNamespace(remote=print)))
    settings = ServeSettings(export_dir=str(export), gallery=str(out))
    arguments = app.rank_model_arguments(settings, str(export / "itm"), str(export / "itc"))
    replica = app.RankModel.func_or_class(*arguments)  # type: ignore[attr-defined]

    def searched(top_k: int | None = None) -> list[tuple[str, int]]:
        answer = replica._search([], [CAPTION], top_k)
        expected = rank_gallery(export, out, CAPTION, top_k=top_k or 100)
        assert [(r["item"], r["index"]) for r in answer["ranking"]] == [(r.label, r.index) for r in expected.rows]
        for mine, theirs in zip(answer["ranking"], expected.rows, strict=True):
            assert abs(mine["match_probability"] - theirs.itm_probability) <= 1e-6
        return [(r["item"], r["index"]) for r in answer["ranking"]]

    def refused(pattern: str) -> None:
        """The replica's answer as the gateway gets it: a 503 with the reason."""
        answer = asyncio.run(replica.search([], [CAPTION], None))
        assert answer["__status__"] == 503 and re.search(pattern, answer["__error__"]), answer

    assert len(searched()) == 3 and replica.gallery.reads == 1
    files += [_photo(folder / f"photo{seed:02d}.png", seed) for seed in (3, 4)]
    index_images(export, folder, out)  # while the replica runs
    assert sorted(searched()) == sorted((path.name, row) for row, path in enumerate(files))
    assert len(searched(2)) == 2 and replica.gallery.reads == 2  # read once per replacement, not per search
    _photo(files[1], 60)  # changed, not indexed again
    refused(rf"{files[1]} changed since .*gallery.npz was indexed: run btdeploy index again")
    index_images(export, folder, out)
    assert len(searched()) == 5 and replica.gallery.reads == 3
    # Replacements this replica cannot search: another graph's, the other kind, not a gallery, none.
    index_images(export, folder, out, {"flavour": "ort"})
    refused(r"gallery.npz was indexed with vision.ort.onnx, this rank runs vision.onnx .*: index again")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    index_texts(export, labels, tmp_path / "labels.npz")
    shutil.copyfile(tmp_path / "labels.npz", out)
    refused(r"gallery.npz now holds texts, this server searches images: index images to that path, or restart")
    out.write_bytes(b"not a gallery")
    refused(r"gallery.npz is not a btdeploy gallery .*\(the file was replaced since the server started\)")
    out.unlink()
    refused(r"gallery.npz cannot be read since the server started \(No such file or directory\): index again")
    index_images(export, folder, out)  # mended
    assert len(searched(3)) == 3


def test_the_rank_replica_never_opens_the_itm_towers_it_shares(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rank replica warms up what its rankings run: the itc towers and the itm fusion graph
    (ITM scores the itc towers' features), a gallery served or not; its rankings and searches are
    the rank command's, and still open no itm tower."""
    from types import SimpleNamespace

    from btdeploy.apps.gallery import index_images, rank_gallery
    from btdeploy.apps.rank import rank
    from btdeploy.serve import app
    from btdeploy.serve.settings import ServeSettings

    monkeypatch.setattr(app, "collector", lambda: SimpleNamespace(record_batch=SimpleNamespace(remote=print)))
    files = _photos(tmp_path / "photos", range(4))
    index_images(export, tmp_path / "photos", tmp_path / "gallery.npz")
    for gallery in (None, tmp_path / "gallery.npz"):
        settings = ServeSettings(export_dir=str(export), gallery=str(gallery) if gallery else None)
        arguments = app.rank_model_arguments(settings, str(export / "itm"), str(export / "itc"))
        replica = app.RankModel.func_or_class(*arguments)  # type: ignore[attr-defined]
        itm, itc = replica.ranker.itm.backend, replica.ranker.itc.backend
        assert (sorted(itm.parts), sorted(itc.parts)) == (["fusion"], ["text", "vision"])
        answers = [
            (
                replica._rank([path.read_bytes() for path in files], [CAPTION], 2),
                rank(export, files, [CAPTION], top_k=2),
            )
        ]
        if gallery:
            answers.append((replica._search([], [CAPTION], 2), rank_gallery(export, gallery, CAPTION, top_k=2)))
        for answer, expected in answers:
            assert answer["stages"] == expected.stages and expected.stages.endswith(", the itc towers' features)")
            for mine, theirs in zip(answer["ranking"], expected.rows, strict=True):
                assert mine["index"] == theirs.index
                assert abs(mine["match_probability"] - theirs.itm_probability) <= 1e-6
        assert sorted(itm.parts) == ["fusion"]
