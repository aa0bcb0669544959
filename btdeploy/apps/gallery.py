"""`btdeploy index` and `rank --gallery`: a folder of images searched by caption, or a list of
captions searched by image, without running a tower on every item for every query.

`index` runs the itc head's vision tower once per image (or its text tower once per caption) and
keeps the contrastive embedding (a few hundred floats, where the tower's states are megabytes),
with each image's name and SHA-256 (or the caption itself). A query then runs the other tower
once, takes the cosine against every stored embedding (ITC), and hands only its top K to ITM,
which reads those images again (or tokenizes those captions). Indexing again reuses the rows of
items that have not changed, so a growing folder costs only its new images.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.apps.rank import (
    BACKENDS,
    CANDIDATE_HEAD,
    DEFAULT_BATCH_SIZE,
    ItemReader,
    Ranker,
    Ranking,
    load_head,
    rank,
)
from btdeploy.apps.run import refuse_long_texts
from btdeploy.artifacts.files import sha256_of, write_bytes
from btdeploy.artifacts.manifest import head_folders, read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.media import export_processor, image_files, read_captions, require_readable_images
from btdeploy.progress import RowProgress, say
from btdeploy.runtime.runtime import SplitRuntime
from btdeploy.runtime.split_runtime import Features

GALLERY_FORMAT = 1
# Per kind of gallery: the itc split graph that makes its embeddings, and the output it keeps.
TOWERS = {"image": ("vision", "image_embeds"), "text": ("text", "text_embeds")}


class GalleryFault(BtDeployError):
    """What is wrong is the gallery, not the query: made by another graph, or an image it indexed
    changed or gone since. A server answers it 503: its operator, not the client, must index again."""


@dataclass
class Gallery:
    """Images of one folder, or captions, with their ITC embeddings and the tower graph that made them."""

    kind: str  # "image" or "text" (a key of TOWERS)
    names: list[str]  # the images' file names in `folder`, or the captions themselves, one per row
    hashes: list[str]  # each image file's SHA-256 when it was indexed, or each caption's
    embeddings: np.ndarray  # [rows, dim] float32, unit vectors
    origin: dict[str, Any]  # checkpoint, graph file and its hash (as Features record them)
    folder: Path | None = None  # where the images are (absolute); None for captions

    @cached_property
    def candidates(self) -> list[Any]:
        """What a ranking takes as the candidates: the images' paths, or the captions (made once:
        a server ranks the same gallery on every request)."""
        if self.folder is None:
            return list(self.names)
        return [self.folder / name for name in self.names]

    @cached_property
    def rows(self) -> dict[Any, int]:
        """Each candidate's row."""
        return {item: row for row, item in enumerate(self.candidates)}

    def require_origin(self, expected: dict[str, Any], where: Path, ranks: str = "this rank runs") -> None:
        """Embeddings of the tower graph a ranking runs, or one line: those of another graph,
        precision or checkpoint do not compare with its other tower's."""
        if self.origin != expected:
            raise GalleryFault(
                f"{where} was indexed with {self.origin.get('graph')}, {ranks} {expected.get('graph')} (another "
                "graph, precision or checkpoint): index again with the same --flavour and --precision, or rank "
                "with those the gallery was made with"
            )

    def save(self, path: Path) -> None:
        """One .npz, written to a temporary name and renamed when complete."""
        meta = {
            "format": GALLERY_FORMAT,
            "kind": self.kind,
            "folder": None if self.folder is None else str(self.folder),
            "names": self.names,
            "hashes": self.hashes,
            "origin": self.origin,
        }
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), embeddings=self.embeddings)
        write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path, option: str = "--gallery", fix: str = "make it with btdeploy index") -> Gallery:
        """The gallery at `path`, or one line naming what is wrong with it; `fix`: what to do about a file
        that is not a gallery."""
        if not path.is_file():
            raise BtDeployError(f"{option} {path} does not exist: make it with btdeploy index")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                embeddings = np.asarray(data["embeddings"])
            folder = Path(meta["folder"]) if meta["folder"] is not None else None
            gallery = cls(meta["kind"], list(meta["names"]), list(meta["hashes"]), embeddings, meta["origin"], folder)
            fmt = meta["format"]
        except Exception as error:  # a damaged or foreign file raises from zipfile, numpy, json or a missing key
            reason = f"{type(error).__name__}: {error}".strip()[:160]
            raise BtDeployError(f"{option} {path} is not a btdeploy gallery ({reason}): {fix}") from None
        if fmt != GALLERY_FORMAT:
            raise BtDeployError(f"{option} {path} has gallery format {fmt}, this btdeploy reads {GALLERY_FORMAT}")
        rows = len(gallery.names)
        shaped = embeddings.dtype == np.float32 and embeddings.ndim == 2 and embeddings.shape[0] == rows
        if gallery.kind not in TOWERS or not shaped or len(gallery.hashes) != rows:
            shape = f"{embeddings.dtype} {list(embeddings.shape)}"
            raise BtDeployError(f"{option} {path} is damaged ({gallery.kind!r}, {rows} names, {shape}): index again")
        return gallery


@dataclass
class IndexReport:
    gallery: Gallery
    encoded: int  # items run through the tower
    reused: int  # rows kept from the gallery already at --out
    dropped: int  # rows of that gallery whose item is gone or changed
    seconds: float


def require_split_candidates(root: Path, what: str) -> None:
    """The itc head with its split graphs, whose towers make and match the embeddings, or one line."""
    heads = {manifest.head: manifest for manifest in map(read_manifest, head_folders(root))}
    if CANDIDATE_HEAD not in heads:
        raise BtDeployError(f"{what} needs the {CANDIDATE_HEAD} head: btdeploy export --heads itc,itm --split")
    if len(heads[CANDIDATE_HEAD].stems) < 2:
        raise BtDeployError(
            f"{what} needs the {CANDIDATE_HEAD} head's split graphs (its towers alone): export it with --split"
        )


def _previous(out: Path, kind: str, origin: dict[str, Any]) -> Gallery | None:
    """The gallery already at `out`, where it was made by the same tower graph; a file that is not
    a gallery is refused, not overwritten."""
    if out.is_dir():
        raise BtDeployError(f"--out {out} is a folder: give the gallery's file name (gallery.npz)")
    if not out.exists():
        return None
    previous = Gallery.load(out, "--out", "give another --out (index does not overwrite other files)")
    if previous.kind != kind:
        raise BtDeployError(
            f"--out {out} is a gallery of {previous.kind}s, this index makes one of {kind}s: give another --out"
        )
    if previous.origin != origin:
        say(f"index: {out} was made by {previous.origin.get('graph')} of another graph or checkpoint: indexing anew")
        return None
    return previous


def _candidate_tower(root: Path, options: dict[str, Any] | None, batch_size: int, backend: str) -> SplitRuntime:
    if batch_size < 1:
        raise BtDeployError(f"--batch-size {batch_size} must be at least 1")
    if backend not in BACKENDS:
        raise BtDeployError(f"--backend {backend}: index runs on {' or '.join(BACKENDS)}")
    require_split_candidates(root, "index")
    tower = load_head(root, CANDIDATE_HEAD, backend, **{k: v for k, v in (options or {}).items() if v is not None})
    assert isinstance(tower, SplitRuntime)  # split graphs, required above
    return tower


def _index(
    tower: SplitRuntime,
    out: Path,
    kind: str,
    names: list[str],
    hashes: list[str],
    folder: Path | None,
    batch_size: int,
    started: float,
) -> IndexReport:
    """Embeddings of every item, those of items the gallery at `out` already holds unchanged reused;
    `started`: when the command began (time.monotonic), for the report."""
    stem, output = TOWERS[kind]
    origin = dict(tower.backend.origin(stem))
    previous = _previous(out, kind, origin)
    known: dict[tuple[str, str], int] = {}
    if previous is not None and previous.folder == folder:
        pairs = zip(previous.names, previous.hashes, strict=True)
        known = {(name, digest): row for row, (name, digest) in enumerate(pairs)}
    new = [row for row, name in enumerate(names) if (name, hashes[row]) not in known]
    reader = ItemReader(export_processor(tower.manifest))
    items: list[Any] = [folder / name for name in names] if folder is not None else list(names)
    encode = reader.image_features if kind == "image" else reader.text_features
    found: dict[int, np.ndarray] = {}
    batches = range(0, len(new), batch_size)
    progress = RowProgress(len(batches), f"index: {stem} tower on {len(new)} {kind}(s), {batch_size} at a time")
    for start in batches:
        rows = new[start : start + batch_size]
        features = encode(tower, [items[row] for row in rows], rows[0])
        for row, embedding in zip(rows, features.arrays[output], strict=True):
            found[row] = embedding
        progress.advance()
    embeddings = [
        found[row] if row in found else previous.embeddings[known[(name, hashes[row])]]  # type: ignore[union-attr]
        for row, name in enumerate(names)
    ]
    stacked = np.stack(embeddings).astype(np.float32)
    gallery = Gallery(kind, names, hashes, stacked, origin, folder)
    gallery.save(out)
    dropped = 0  # rows of the previous gallery no item of this one is
    if previous is not None:
        current = set(zip(names, hashes, strict=True)) if previous.folder == folder else set()
        dropped = sum(pair not in current for pair in zip(previous.names, previous.hashes, strict=True))
    return IndexReport(gallery, len(new), len(names) - len(new), dropped, time.monotonic() - started)


def index_images(
    root: Path,
    folder: Path,
    out: Path,
    options: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: str = "onnxruntime",
) -> IndexReport:
    """The ITC embedding of every image in `folder`, saved at `out`; rows of unchanged images reused."""
    started = time.monotonic()
    files = image_files(folder, "--images")
    tower = _candidate_tower(root, options, batch_size, backend)
    hashing = RowProgress(len(files), f"index: hashing {len(files)} image(s) in {folder}")
    hashes = []
    for path in files:
        hashes.append(_file_hash(path))
        require_readable_images([path], "index")  # a file that is no image refused before the embeddings
        hashing.advance()
    return _index(tower, out, "image", [path.name for path in files], hashes, folder.resolve(), batch_size, started)


def index_texts(
    root: Path,
    captions: Path,
    out: Path,
    options: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: str = "onnxruntime",
) -> IndexReport:
    """The ITC embedding of every caption in the file (one per line), saved at `out`."""
    started = time.monotonic()
    texts = read_captions(captions, "--texts")
    tower = _candidate_tower(root, options, batch_size, backend)
    refuse_long_texts(export_processor(tower.manifest), texts, tower.manifest)  # before any work
    hashes = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
    return _index(tower, out, "text", texts, hashes, None, batch_size, started)


def _file_hash(path: Path, fault: type[BtDeployError] = BtDeployError) -> str:
    try:
        return sha256_of(path)
    except OSError as error:
        reason = f"cannot read {path} ({error.strerror})"
        raise fault(f"{reason}: make it readable or move it out of the folder") from None


class GalleryItems(ItemReader):
    """A gallery's items: the itc head's embeddings read from the gallery, not computed; an image of
    the gallery read again (for ITM) only where its bytes are those that were indexed. The query's
    items are read by `others` (default: images as files)."""

    def __init__(self, processor: Any, gallery: Gallery, where: Path, others: ItemReader | None = None) -> None:
        super().__init__(processor)
        self.gallery = gallery
        self.where = where  # the gallery file, for messages
        self.others = others or ItemReader(processor)
        self.rows = gallery.rows
        self.of_images = gallery.kind == "image"

    def label(self, item: Any, index: int) -> str:
        return self.gallery.names[self.rows[item]] if self.of_images else self.others.label(item, index)

    def check_texts(self, ranker: Ranker, texts: list[str]) -> None:
        if self.of_images:  # the query; a gallery's captions were held to the model's length when indexed
            self.others.check_texts(ranker, texts)

    def pictures(self, items: list[Any], first: int) -> list[Any]:
        if not self.of_images:
            return self.others.pictures(items, first)
        for item in items:
            row = self.rows[item]
            if not item.is_file():
                raise GalleryFault(
                    f"{item} is gone since {self.where} was indexed: run btdeploy index again on {self.gallery.folder}"
                )
            if _file_hash(item, GalleryFault) != self.gallery.hashes[row]:
                raise GalleryFault(
                    f"{item} changed since {self.where} was indexed: run btdeploy index again on {self.gallery.folder}"
                )
        return super().pictures(items, first)

    def pixels(self, items: list[Any], first: int) -> np.ndarray:
        return super().pixels(items, first) if self.of_images else self.others.pixels(items, first)

    def _stored(self, runtime: SplitRuntime, items: list[Any]) -> Features:
        stem, output = TOWERS[self.gallery.kind]
        expected = runtime.backend.origin(stem)
        self.gallery.require_origin(expected, self.where)
        rows = [self.rows[item] for item in items]
        return Features(self.gallery.kind, {output: self.gallery.embeddings[rows]}, dict(expected))

    def image_features(
        self, runtime: SplitRuntime, items: list[Any], first: int, embeddings_only: bool = False
    ) -> Features:
        if not self.of_images:
            return self.others.image_features(runtime, items, first, embeddings_only)
        if embeddings_only:  # the ITC stage: the stored embeddings (held to the runtime's graph)
            return self._stored(runtime, items)
        return super().image_features(runtime, items, first)

    def text_features(
        self, runtime: SplitRuntime, texts: list[str], first: int, embeddings_only: bool = False
    ) -> Features:
        if not self.of_images and embeddings_only:
            return self._stored(runtime, texts)
        return self.others.text_features(runtime, texts, first, embeddings_only)


def gallery_kind(path: Path) -> str:
    """What a gallery holds ("image" or "text"), read from its record alone (not its embeddings)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return str(json.loads(bytes(data["__meta__"]).decode())["kind"])
    except Exception:  # anything wrong is said by Gallery.load
        return Gallery.load(path).kind


def ranked_against(gallery: Gallery, query: Any) -> tuple[list[Any], list[Any]]:
    """The (images, texts) a ranking of the gallery against one query takes."""
    if gallery.kind == "image":
        return gallery.candidates, [query]
    return [query], gallery.candidates


def rank_gallery(
    root: Path,
    gallery_path: Path,
    query: str | Path,
    top_k: int = 5,
    options: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: str = "onnxruntime",
) -> Ranking:
    """The gallery's items ranked against one query, a caption (str) for a gallery of images or an
    image (Path) for one of captions: ITC on the stored embeddings, ITM on the top K."""
    require_split_candidates(root, "rank --gallery")
    gallery = Gallery.load(gallery_path)
    if not gallery.names:
        raise BtDeployError(f"--gallery {gallery_path} holds nothing: index a folder or captions file that has some")
    wanted = "image" if isinstance(query, Path) else "text"
    if gallery.kind == wanted:
        against = "--text TEXT" if gallery.kind == "image" else "--image IMG"
        raise BtDeployError(f"--gallery {gallery_path} holds {gallery.kind}s: rank it against {against}")

    if isinstance(query, Path):
        require_readable_images([query], "rank")  # before the heads load

    def reader(ranker: Ranker) -> ItemReader:
        return GalleryItems(ranker.processor, gallery, gallery_path)

    return rank(root, *ranked_against(gallery, query), top_k, options, batch_size, backend, reader)
