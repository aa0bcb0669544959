"""ONNX graphs on disk: one file, or one file plus `<file>.data` past protobuf's 2 GB, written atomically."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError
from onnx.external_data_helper import load_external_data_for_model

from btdeploy.artifacts.files import default_mode, sha256_of
from btdeploy.artifacts.streamed_proto import encoded_size, read_model, write_encoded
from btdeploy.artifacts.weightless import NO_WEIGHTS, WeightBytes, weightless_with_side_file
from btdeploy.errors import BtDeployError

PROTOBUF_LIMIT = 2**31 - 1  # one ONNX protobuf file cannot exceed 2 GB
# Graphs larger than this many bytes keep their weights in `<file>.data`. Protobuf's limit unless
# set lower: tests force the external-data path on tiny graphs, and some deployments (Triton, a
# memory-mapped load) want it for every graph.
EXTERNAL_DATA_ENV = "BTDEPLOY_EXTERNAL_DATA_BYTES"
# Past the threshold, weights up to this many bytes stay in the graph, as onnx.save_model keeps
# them (it moves a tensor whose sys.getsizeof is 1 KB or more): the files are those it writes.
INLINE_WEIGHT_BYTES = 1024 - sys.getsizeof(b"") - 1


def external_data_threshold() -> int:
    value = os.environ.get(EXTERNAL_DATA_ENV)
    if value is None:
        return PROTOBUF_LIMIT
    try:
        threshold = int(value)
    except ValueError:
        raise BtDeployError(f"{EXTERNAL_DATA_ENV}={value!r} is not a number of bytes: unset it or give one") from None
    return min(max(threshold, 0), PROTOBUF_LIMIT)


def needs_external_data(size: int) -> bool:
    """Whether a graph of `size` bytes (weights included) is stored with external data."""
    return size > external_data_threshold()


def data_file(path: Path) -> Path:
    """Where the weights of a graph past 2 GB live: `<file>.data`, the name every btdeploy writer uses."""
    return path.with_name(path.name + ".data")


def absent_weight_files(model: onnx.ModelProto, folder: Path) -> list[str]:
    """The files `model` names for its weights (external data) that are not in `folder`."""
    named = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return sorted(name for name in named if not (folder / name).is_file())


def missing_weight_files(path: Path) -> list[str]:
    """The files the graph names for its weights (external data) that are not beside it: a copy
    that left its `.data` behind. Empty where every one is there, or the graph names none. The
    weights are not read (milliseconds on base's 1.3 GB graphs)."""
    try:
        model = read_model(path, weights_up_to=INLINE_WEIGHT_BYTES)
    except Exception:  # unreadable: the caller's own message says so
        return []
    return absent_weight_files(model, path.parent)


def missing_weights_problem(path: Path) -> str | None:
    """One line naming the weight files a graph lacks, and what to do; None where none is missing."""
    missing = missing_weight_files(path)
    if not missing:
        return None
    which, them = ("is", "it") if len(missing) == 1 else ("are", "them")
    return (
        f"{path} keeps its weights in {', '.join(missing)}, which {which} not beside it: copy {them} there too "
        f"(a graph past 2 GB, or written with {EXTERNAL_DATA_ENV}, is two files), or make the graph again"
    )


def graph_bytes(path: Path) -> int:
    """An ONNX graph's size on disk: the file plus its `.data` file, if any."""
    data = data_file(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def graph_sha256(path: Path) -> str:
    """One hash of a graph's bytes: the file, then its `.data` file (weights) when it has one."""
    data = data_file(path)
    return sha256_of(path, *([data] if data.is_file() else []))


def load_graph(path: Path, what: str, load_weights: bool = True) -> onnx.ModelProto:
    """Read a graph, or one line saying it is damaged and what to do. Without `load_weights` every
    weight past INLINE_WEIGHT_BYTES stays on disk, whether the graph keeps it in its `.data` file or
    in itself: the graph then looks the same either way, and reading it takes milliseconds."""
    if not path.is_file():
        raise BtDeployError(f"{path} is missing: {what}")
    try:
        model = read_model(path, weights_up_to=None if load_weights else INLINE_WEIGHT_BYTES)
        if load_weights:
            load_external_data_for_model(model, str(path.parent))
        return model
    except Exception as error:
        problem = missing_weights_problem(path) if load_weights else None
        raise BtDeployError(problem or f"cannot read {path} ({str(error).strip()[:200]}): {what}") from None


def save_graph_atomically(
    model: onnx.ModelProto, path: Path, external: bool | None = None, apart: WeightBytes = NO_WEIGHTS
) -> bool:
    """Write model (and its `.data` past 2 GB, or whatever its size with `external`) under temporary
    names, then rename into place; the stubs of the weights `apart` holds get those bytes. The model
    itself is left as it was. Returns whether the weights went to `.data`."""
    with GraphBatch() as batch:
        batch.stage(model, path, external, apart)
        return len(batch.staged) > 1


class GraphBatch:
    """Several graphs that must appear together (a head's whole and split graphs of one step):
    each is written under a temporary name first, and only when all are written are they renamed
    into place; on failure none of them replaces what was there."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def __enter__(self) -> GraphBatch:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        """Commit when the block completed, discard the staged files when it raised (or was interrupted)."""
        if kind is None:
            self.commit()
        else:
            self.discard()

    def stage(
        self, model: onnx.ModelProto, path: Path, external: bool | None = None, apart: WeightBytes = NO_WEIGHTS
    ) -> None:
        self.staged += _write_temporary(model, path, external, apart)

    def commit(self) -> None:
        # Data files first, so a graph never appears before the weights it names.
        try:
            for tmp, final in sorted(self.staged, key=lambda pair: not pair[1].name.endswith(".data")):
                os.replace(tmp, final)
        finally:
            self.discard()  # what a failed rename left under a temporary name

    def discard(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged = []


def serialized_bytes(model: onnx.ModelProto, apart: WeightBytes = NO_WEIGHTS) -> int:
    """The model's size as one protobuf, or past the 2 GB limit where protobuf cannot measure a part
    of it (ByteSize raises on a message it could not serialize)."""
    try:
        return encoded_size(model, apart)
    except EncodeError:
        return PROTOBUF_LIMIT + 1


def _write_temporary(
    model: onnx.ModelProto, path: Path, external: bool | None, apart: WeightBytes
) -> list[tuple[Path, Path]]:
    """Write model (and its `.data` past 2 GB, or with `external`) under temporary names; returns
    (temporary, final) pairs. The graph names its data file by the final name."""
    large = needs_external_data(serialized_bytes(model, apart)) if external is None else external
    final_data = data_file(path)
    pairs = [(path, _temporary(path))] + ([(final_data, _temporary(final_data))] if large else [])
    try:
        if large:  # a copy of the graph whose weights name the data file (onnx's save strips the model's own)
            model = weightless_with_side_file(model, pairs[1][1], final_data.name, INLINE_WEIGHT_BYTES, apart)
            apart = NO_WEIGHTS  # the copy holds every weight as a reference, or inline
        with open(pairs[0][1], "wb") as stream:
            write_encoded(model, stream, apart)
        for _, tmp in pairs:  # as a plain open() would make them: a server running as another user reads both
            os.chmod(tmp, default_mode(directory=False))
    except BaseException:
        for _, tmp in pairs:
            tmp.unlink(missing_ok=True)
        raise
    return [(tmp, final) for final, tmp in pairs]


def _temporary(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    return Path(tmp)
