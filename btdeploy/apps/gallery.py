"""`btdeploy index` and `rank --gallery`: a folder of images searched by caption without running
the vision tower on every image for every query.

`index` runs the itc head's vision tower once per image and keeps its contrastive embedding (a
few hundred floats, where the tower's states are megabytes) with the image's name and SHA-256.
A query then runs the text tower once, takes the cosine against every stored embedding (ITC),
and reads only its top K images again for ITM. Indexing again reuses the rows of images that
have not changed, so a growing folder costs only its new images.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.apps.rank import (
    BACKENDS,
    CANDIDATE_HEAD,
    DEFAULT_BATCH_SIZE,
    ImageFiles,
    Ranker,
    Ranking,
    load_head,
    rank,
)
from btdeploy.artifacts.files import sha256_of, write_bytes
from btdeploy.artifacts.manifest import head_folders, read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.media import export_processor, image_files
from btdeploy.progress import RowProgress, say
from btdeploy.runtime.runtime import SplitRuntime
from btdeploy.runtime.split_runtime import Features

GALLERY_FORMAT = 1
EMBEDDINGS = "image_embeds"  # what the itc head's vision tower emits for the contrastive stage


@dataclass
class Gallery:
    """Images of one folder with their ITC embeddings, and the vision graph that made them."""

    folder: Path  # where the images are (absolute)
    names: list[str]  # file names in that folder, one per row
    hashes: list[str]  # each file's SHA-256 when it was indexed
    embeddings: np.ndarray  # [images, dim] float32, unit vectors
    origin: dict[str, Any]  # checkpoint, graph file and its hash (as Features record them)

    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.names]

    def require_origin(self, expected: dict[str, Any], where: Path, ranks: str = "this rank runs") -> None:
        """Embeddings of the vision graph a ranking runs, or one line: those of another graph,
        precision or checkpoint do not compare with its text tower's."""
        if self.origin != expected:
            raise BtDeployError(
                f"{where} was indexed with {self.origin.get('graph')}, {ranks} {expected.get('graph')} (another "
                "graph, precision or checkpoint): index again with the same --flavour and --precision, or rank "
                "with those the gallery was made with"
            )

    def save(self, path: Path) -> None:
        """One .npz, written to a temporary name and renamed when complete."""
        meta = {
            "format": GALLERY_FORMAT,
            "folder": str(self.folder),
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
            raise BtDeployError(f"{option} {path} does not exist: make it with btdeploy index DIR --images FOLDER")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                embeddings = np.asarray(data["embeddings"])
            gallery = cls(Path(meta["folder"]), list(meta["names"]), list(meta["hashes"]), embeddings, meta["origin"])
            fmt = meta["format"]
        except Exception as error:  # a damaged or foreign file raises from zipfile, numpy, json or a missing key
            reason = f"{type(error).__name__}: {error}".strip()[:160]
            raise BtDeployError(f"{option} {path} is not a btdeploy gallery ({reason}): {fix}") from None
        if fmt != GALLERY_FORMAT:
            raise BtDeployError(f"{option} {path} has gallery format {fmt}, this btdeploy reads {GALLERY_FORMAT}")
        rows = len(gallery.names)
        if (
            embeddings.dtype != np.float32
            or embeddings.ndim != 2
            or embeddings.shape[0] != rows
            or len(gallery.hashes) != rows
        ):
            raise BtDeployError(
                f"{option} {path} is damaged ({rows} names, embeddings {embeddings.shape}): index again"
            )
        return gallery


@dataclass
class IndexReport:
    gallery: Gallery
    encoded: int  # images run through the vision tower
    reused: int  # rows kept from the gallery already at --out
    dropped: int  # rows of that gallery whose image is gone or changed
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


def _previous(out: Path, origin: dict[str, Any]) -> Gallery | None:
    """The gallery already at `out`, where it was made by the same vision graph; a file that is not
    a gallery is refused, not overwritten."""
    if out.is_dir():
        raise BtDeployError(f"--out {out} is a folder: give the gallery's file name (gallery.npz)")
    if not out.exists():
        return None
    previous = Gallery.load(out, "--out", "give another --out (index does not overwrite other files)")
    if previous.origin != origin:
        say(f"index: {out} was made by {previous.origin.get('graph')} of another graph or checkpoint: indexing anew")
        return None
    return previous


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
    if batch_size < 1:
        raise BtDeployError(f"--batch-size {batch_size} must be at least 1")
    if backend not in BACKENDS:
        raise BtDeployError(f"--backend {backend}: index runs on {' or '.join(BACKENDS)}")
    files = image_files(folder, "--images")
    require_split_candidates(root, "index")
    tower = load_head(root, CANDIDATE_HEAD, backend, **{k: v for k, v in (options or {}).items() if v is not None})
    assert isinstance(tower, SplitRuntime)  # split graphs, required above
    origin = dict(tower.backend.origin("vision"))
    previous = _previous(out, origin)
    hashing = RowProgress(len(files), f"index: hashing {len(files)} image(s) in {folder}")
    hashes = []
    for path in files:
        hashes.append(_file_hash(path))
        hashing.advance()
    known: dict[tuple[str, str], int] = {}
    if previous is not None and previous.folder == folder.resolve():
        pairs = zip(previous.names, previous.hashes, strict=True)
        known = {(name, digest): row for row, (name, digest) in enumerate(pairs)}
    new = [row for row, path in enumerate(files) if (path.name, hashes[row]) not in known]
    source = ImageFiles(export_processor(tower.manifest))
    found: dict[int, np.ndarray] = {}
    batches = range(0, len(new), batch_size)
    progress = RowProgress(len(batches), f"index: vision tower on {len(new)} image(s), {batch_size} at a time")
    for start in batches:
        rows = new[start : start + batch_size]
        features = source.features(tower, [files[row] for row in rows], rows[0])
        for row, embedding in zip(rows, features.arrays[EMBEDDINGS], strict=True):
            found[row] = embedding
        progress.advance()
    embeddings = [
        found[row] if row in found else previous.embeddings[known[(path.name, hashes[row])]]  # type: ignore[union-attr]
        for row, path in enumerate(files)
    ]
    gallery = Gallery(
        folder.resolve(), [path.name for path in files], hashes, np.stack(embeddings).astype(np.float32), origin
    )
    gallery.save(out)
    reused = len(files) - len(new)
    dropped = (len(previous.names) - reused) if previous is not None else 0
    return IndexReport(gallery, len(new), reused, dropped, time.monotonic() - started)


def _file_hash(path: Path) -> str:
    try:
        return sha256_of(path)
    except OSError as error:
        reason = f"cannot read {path} ({error.strerror})"
        raise BtDeployError(f"{reason}: make it readable or move it out of the folder") from None


class GalleryImages(ImageFiles):
    """A gallery's images: the itc head's embeddings read from the gallery, not computed; an image
    read again (for ITM) only where its bytes are those that were indexed."""

    def __init__(self, processor: Any, gallery: Gallery, where: Path) -> None:
        super().__init__(processor)
        self.gallery = gallery
        self.where = where  # the gallery file, for messages
        self.rows = {path: row for row, path in enumerate(gallery.paths())}

    def label(self, item: Any, index: int) -> str:
        return self.gallery.names[self.rows[item]]

    def pictures(self, items: list[Any], first: int) -> list[Any]:
        for item in items:
            row = self.rows[item]
            if not item.is_file():
                raise BtDeployError(
                    f"{item} is gone since {self.where} was indexed: run btdeploy index again on {self.gallery.folder}"
                )
            if _file_hash(item) != self.gallery.hashes[row]:
                raise BtDeployError(
                    f"{item} changed since {self.where} was indexed: run btdeploy index again on {self.gallery.folder}"
                )
        return super().pictures(items, first)

    def features(self, runtime: SplitRuntime, items: list[Any], first: int) -> Features:
        if runtime.head.name != CANDIDATE_HEAD:
            return super().features(runtime, items, first)
        expected = runtime.backend.origin("vision")
        self.gallery.require_origin(expected, self.where)
        rows = [self.rows[item] for item in items]
        return Features("image", {EMBEDDINGS: self.gallery.embeddings[rows]}, dict(expected))


def rank_gallery(
    root: Path,
    gallery_path: Path,
    text: str,
    top_k: int = 5,
    options: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: str = "onnxruntime",
) -> Ranking:
    """The gallery's images ranked against one caption: ITC on the stored embeddings, ITM on the top K."""
    require_split_candidates(root, "rank --gallery")
    gallery = Gallery.load(gallery_path)
    if not gallery.names:
        raise BtDeployError(f"--gallery {gallery_path} holds no images: index a folder that has some")

    def source(ranker: Ranker) -> ImageFiles:
        return GalleryImages(ranker.processor, gallery, gallery_path)

    return rank(root, gallery.paths(), [text], top_k, options, batch_size, backend, source)
