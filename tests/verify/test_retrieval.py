"""`check --images --texts` ranks every image for each caption and every caption for each image, on
the reference and on the graph (itc by its embeddings' cosine; itm by each pair's match log-odds,
with --all-pairs): held to each other as logits are, and reported as retrieval is measured (top-1
as the reference, top-K overlap, Recall@K against the pairs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

from btdeploy.model.heads import get_head
from btdeploy.verify import retrieval
from btdeploy.verify.parity import shortfalls
from btdeploy.verify.retrieval import PairedScores, PairLayout, retrieval_rows, retrieval_summary

CAPTIONS = ["a cat", "two dogs asleep on a red couch", "a bus", "the sea at night"]


def test_the_summary_counts_swaps_overlap_and_recall(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three queries, three items, each query's own item on the diagonal; worked by hand."""
    monkeypatch.setattr(retrieval, "TOP_K", 2)
    reference = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7], [0.3, 0.4, 0.6]])
    got = np.array([[0.9, 0.5, 0.1], [0.2, 0.7, 0.8], [0.65, 0.4, 0.6]])
    found = retrieval_summary(reference, got, np.eye(3, dtype=bool))
    # Query 0 keeps its top-1; query 1 swaps items 1 and 2 (0.1 apart in the reference); query 2
    # takes item 0, which the reference put 0.3 below its own top-1 (item 2).
    assert (found["queries"], found["items"], found["k"], found["top1_same"]) == (3, 3, 2, 1)
    assert found["largest_swapped_margin"] == pytest.approx(0.3)
    # Top 2: {0,1}/{0,1}, {1,2}/{2,1}, {2,1}/{0,2}: overlaps 1, 1 and 1/2.
    assert found["top_k_overlap"] == pytest.approx(2.5 / 3)
    assert found["recall_at_1"] == {"reference": 1.0, "graph": pytest.approx(1 / 3)}
    assert found["recall_at_k"] == {"reference": 1.0, "graph": 1.0}
    same = retrieval_summary(reference, reference, np.eye(3, dtype=bool))
    assert same["top1_same"] == 3 and same["largest_swapped_margin"] is None and same["top_k_overlap"] == 1.0


def test_the_layout_pairs_rows_as_the_lists_do_or_every_caption_with_every_image() -> None:
    """Three captions, two images; worked by hand."""
    paired = PairLayout(captions=3, images=2)
    assert paired.rows == 3 and [paired.indices(k) for k in range(3)] == [(0, 0), (1, 1), (2, 0)]
    grid = PairLayout(captions=3, images=2, every_pair=True)
    assert grid.rows == 6
    assert [grid.indices(k) for k in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    truth = [[True, False], [False, True], [True, False]]  # caption k with image k % 2, either way
    assert paired.truth().tolist() == truth and grid.truth().tolist() == truth


def test_itm_ranks_by_the_log_odds_of_each_pair_and_only_over_every_pair() -> None:
    """Match logits of every caption with every image, two per batch: the score matrix is logit 1 -
    logit 0 of each pair's own row, and a graph that prefers other images fails."""
    head = get_head("itm")
    assert head.retrieval is not None
    layout = PairLayout(captions=3, images=3, every_pair=True)
    odds = np.array([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0], [0.0, -1.0, 3.0]])  # each caption's own image first
    wrong = odds[:, [1, 2, 0]]  # every caption's top-1 moved
    logits = np.stack([np.zeros(9), odds.ravel()], axis=1) + 0.25  # logit 1 - logit 0 = the log-odds
    moved = np.stack([np.zeros(9), wrong.ravel()], axis=1) + 0.25
    paired = PairedScores(head.retrieval, layout)
    for start in range(0, 9, 2):
        rows = slice(start, start + 2)
        paired.observe({"logits": logits[rows]}, {"logits": moved[rows]})
    assert np.allclose(paired.scores("reference"), odds) and np.allclose(paired.scores("graph"), wrong)
    text_to_image, image_to_text = retrieval_rows(head, paired, "fp32")
    assert text_to_image.retrieval is not None and text_to_image.retrieval["score"] == "match log-odds"
    assert text_to_image.retrieval["top1_same"] == 0 and not text_to_image.passed
    assert text_to_image.retrieval["recall_at_1"] == {"reference": 1.0, "graph": 0.0}
    assert image_to_text.retrieval is not None and image_to_text.retrieval["recall_at_1"]["reference"] == 1.0
    # Image k with caption k alone holds one score per caption: nothing to rank.
    lone = PairedScores(head.retrieval, PairLayout(captions=3, images=3))
    lone.observe({"logits": logits[:3]}, {"logits": logits[:3]})
    assert not lone.rankable and retrieval_rows(head, lone, "fp32") == []
    assert lone.unrankable() == "it ranks with --all-pairs (every caption with every image)"


def _embeddings(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_graph_that_ranks_otherwise_fails_the_fp32_floor() -> None:
    """Images whose embeddings come back in another order: every clear top-1 moves, and the rows fail."""
    head = get_head("itc")
    assert head.retrieval is not None
    paired = PairedScores(head.retrieval, PairLayout(captions=6, images=6))
    texts, images = _embeddings(6, 16, 0), _embeddings(6, 16, 1)
    texts = 0.3 * texts + images  # each caption nearest its own image, by a clear margin
    shuffled = images[[1, 2, 3, 4, 5, 0]]
    for start in (0, 4):  # two batches, as check runs them
        rows = slice(start, min(start + 4, 6))
        paired.observe(
            {"text_embeds": texts[rows], "image_embeds": images[rows]},
            {"text_embeds": texts[rows], "image_embeds": shuffled[rows]},
        )
    text_to_image, image_to_text = retrieval_rows(head, paired, "fp32")
    assert (text_to_image.output, image_to_text.output) == ("text_to_image", "image_to_text")
    for row in (text_to_image, image_to_text):
        assert not row.passed and row.retrieval is not None
        assert row.stats.argmax_counted == 6 and row.stats.argmax_agree == 0, row.stats
        assert any(line.startswith("argmax agreement 0.0%") for line in shortfalls(row.stats, row.tolerance))
        assert row.retrieval["top1_same"] == 0
        assert row.retrieval["recall_at_1"] == {"reference": 1.0, "graph": 0.0}
    # The same embeddings on both sides pass, every query agreeing.
    same = PairedScores(head.retrieval, PairLayout(captions=6, images=6))
    same.observe({"text_embeds": texts, "image_embeds": images}, {"text_embeds": texts, "image_embeds": images})
    assert all(row.passed and row.stats.argmax_agree == 6 for row in retrieval_rows(head, same, "fp32"))
    # One caption, or one image, has nothing to rank: no rows.
    one = PairedScores(head.retrieval, PairLayout(captions=1, images=6))
    one.observe({"text_embeds": texts, "image_embeds": images}, {"text_embeds": texts, "image_embeds": images})
    assert retrieval_rows(head, one, "fp32") == []
    assert one.unrankable() == "1 caption(s) and 6 image(s): ranking needs two of each"


@pytest.fixture()
def pairs(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        pixels = (np.random.default_rng(k).random((50 + 10 * k, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return folder, tmp_path / "captions.txt"


def test_check_ranks_the_pairs_as_the_runtime_does(
    tiny_export: Path, pairs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three images, four captions (row k: image k % 3, caption k % 4): the retrieval rows' graph
    side is the ranking btdeploy's own runtime makes of each caption and image alone."""
    import btdeploy
    from btdeploy.cli import main
    from btdeploy.model.media import export_processor, load_image

    folder, texts = pairs
    report = tmp_path / "parity.json"
    argv = ["check", str(tiny_export), "--heads", "itc", "--images", str(folder), "--texts", str(texts)]
    assert main([*argv, "--batch-sizes", "3", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    rows = {row["output"]: row for row in json.loads(report.read_text())["rows"]}
    assert list(rows) == ["logits", "text_embeds", "image_embeds", "cross_embeds", "text_to_image", "image_to_text"]
    model = btdeploy.load(tiny_export, head="itc")
    processor = export_processor(model.manifest)
    pictures = [load_image(folder / f"{k}.png", processor.image_processor) for k in range(3)]
    image_embeds = np.concatenate(
        [model(**processor(images=picture, text=["x"], return_tensors="np")).image_embeds for picture in pictures]
    )
    text_embeds = np.concatenate(
        [model(**processor(images=pictures[0], text=[caption], return_tensors="np")).text_embeds
         for caption in CAPTIONS]
    )  # fmt: skip
    _ranked_as_the_runtime(rows, text_embeds @ image_embeds.T, "itc", "cosine", printed)


def test_check_ranks_every_pair_by_match_as_the_runtime_scores_it(
    tiny_export: Path, pairs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """itm with --all-pairs: four captions with each of three images (12 rows), and its retrieval
    rows' graph side the log-odds btdeploy's own runtime gives each pair run alone. Without
    --all-pairs it says how to rank them, and ranks nothing."""
    import btdeploy
    from btdeploy.cli import main
    from btdeploy.model.media import export_processor, load_image

    folder, texts = pairs
    report = tmp_path / "parity.json"
    argv = ["check", str(tiny_export), "--heads", "itm", "--images", str(folder), "--texts", str(texts)]
    assert main([*argv, "--batch-sizes", "5", "--report", str(report)]) == 0
    assert "check itm: no ranking rows: it ranks with --all-pairs (every caption" in capsys.readouterr().err
    assert [row["output"] for row in json.loads(report.read_text())["rows"]] == ["logits"]

    junit = tmp_path / "parity.xml"
    assert main([*argv, "--batch-sizes", "5", "--all-pairs", "--report", str(report), "--junit", str(junit)]) == 0
    printed = capsys.readouterr()
    # CI's test report shows the ranking line under each passing ranking row.
    outputs = {case.get("name"): case.findtext("system-out") for case in ElementTree.parse(junit).iter("testcase")}
    assert outputs["logits [model.onnx]"] is None
    for output in ("text_to_image", "image_to_text"):
        assert (outputs[f"{output} [model.onnx]"] or "").startswith(f"itm {output}: each of "), outputs
    assert "12 pairs (every caption with every image) from 3 image(s) and 4 caption(s), 5 at a time" in printed.err
    assert "check itm: batches: 3/3, " in printed.err  # counted as they run
    recorded = json.loads(report.read_text())
    assert recorded["inputs"]["every_pair"] is True
    rows = {row["output"]: row for row in recorded["rows"]}
    assert list(rows) == ["logits", "text_to_image", "image_to_text"]
    assert [shape["batch"] for shape in rows["logits"]["per_shape"]] == [5, 5, 2]
    model = btdeploy.load(tiny_export, head="itm")
    processor = export_processor(model.manifest)
    pictures = [load_image(folder / f"{k}.png", processor.image_processor) for k in range(3)]
    odds = np.zeros((4, 3))
    for c, caption in enumerate(CAPTIONS):
        for i, picture in enumerate(pictures):
            (logits,) = model(**processor(images=picture, text=[caption], return_tensors="np")).logits
            odds[c, i] = logits[1] - logits[0]
    _ranked_as_the_runtime(rows, odds, "itm", "match log-odds", printed.out)


def _ranked_as_the_runtime(
    rows: dict[str, dict[str, Any]], scores: np.ndarray, head: str, score: str, printed: str
) -> None:
    """The report's ranking rows of four captions and three images (paired image k with caption k
    % 4) against `scores` [captions, images], which btdeploy's runtime gave each caption and image
    alone: FP32 parity, and the graph's recall and top-1 those of the runtime's own ranking."""
    truth = np.zeros((4, 3), dtype=bool)
    for k in range(4):
        truth[k % 4, k % 3] = True
    for output, matrix, own in (("text_to_image", scores, truth), ("image_to_text", scores.T, truth.T)):
        row = rows[output]
        assert row["passed"] and row["max_abs"] <= 1e-4, row
        found = row["retrieval"]
        queries, items = matrix.shape
        assert (found["score"], found["queries"], found["items"], found["k"]) == (score, queries, items, min(5, items))
        assert found["recall_at_1"]["graph"] == pytest.approx(own[np.arange(queries), matrix.argmax(axis=1)].mean())
        assert found["top1_same"] == queries  # FP32: the graph ranks as the reference
        query, item = ("caption", "image") if output == "text_to_image" else ("image", "caption")
        assert f"{head} {output}: each of {queries} {query}s ranks {items} {item}s by {score}; " in printed
