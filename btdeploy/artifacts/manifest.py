"""The manifest beside each exported head: what it is, where it came from, how to rebuild its reference."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_json
from btdeploy.artifacts.graph_names import STEMS, Flavour, Precision, graph_file
from btdeploy.artifacts.locks import writer_of
from btdeploy.artifacts.onnx_files import graph_bytes, graph_sha256, missing_weights_problem
from btdeploy.artifacts.stored_config import StoredConfig
from btdeploy.errors import BtDeployError
from btdeploy.version import __version__

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
PROCESSOR_DIR = "processor"
# Why export found btdeploy's own reading of the processor (model/preprocessor) not transformers',
# where it did: the commands then read it with transformers.
PROCESSOR_READ_BY_TRANSFORMERS = "processor_read_by_transformers"


def package_version(package: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    import importlib.metadata as metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def tool_versions(
    packages: tuple[str, ...] = ("btdeploy", "torch", "transformers", "onnx", "onnxruntime-gpu", "numpy"),
) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in packages:
        version = package_version(package)
        if version is None and package == "btdeploy":  # a checkout on PYTHONPATH, not installed
            version = __version__
        if version is None and package == "onnxruntime-gpu" and (cpu_build := package_version("onnxruntime")):
            package, version = "onnxruntime", cpu_build  # the same module, without CUDA
        versions[package] = version or "not installed"
    return versions


@dataclass
class Manifest:
    """A thin view over manifest.json with the fields the rest of btdeploy reads."""

    folder: Path
    data: dict[str, Any]
    reused: bool = False  # the step that returned it kept what was on disk instead of writing it

    @property
    def head(self) -> str:
        return str(self.data["head"])

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_NAME

    @property
    def stems(self) -> list[str]:
        """The graphs of this head: `model`, plus `text`, `vision`, `fusion` after export --split."""
        return ["model", *(stem for stem in STEMS if stem in self.data.get("split", {}))]

    def input_names(self, stem: str = "model") -> list[str]:
        """The inputs of one of the head's graphs, as exported (quantizing keeps them)."""
        if stem == "model":
            return [entry["name"] for entry in self.data["inputs"]]
        return list(self.data["split"][stem]["inputs"])

    def graph_path(
        self,
        flavour: Flavour | None = None,
        precision: Precision = Precision.FP32,
        stem: str = "model",
        full_hash: bool = False,
    ) -> Path:
        """<stem>.onnx, the optimized <stem>.<flavour>.onnx, or its <stem>.<flavour>.<precision>.onnx
        (with a clear error that names the command which makes it when it is absent).

        Every graph handed out is held to its manifest record (its size; its sha256 with
        `full_hash`), so no step runs, optimizes, quantizes or ships a graph that was replaced."""
        if stem not in self.stems:
            raise BtDeployError(
                f"{self.folder} has no {stem} graph: export with --split for the text, vision and fusion graphs"
            )
        path = self.folder / graph_file(flavour, precision, stem)
        if path.is_file():
            self.verify_graph(path, full=full_hash)
            return path
        if flavour is None:
            raise BtDeployError(f"{path} is missing: export the head again (btdeploy export)")
        if precision != Precision.FP32:
            raise BtDeployError(
                f"{path} does not exist: "
                f"run btdeploy quantize {self.folder} --flavour {flavour} --precision {precision}"
            )
        raise BtDeployError(f"{path} does not exist: run btdeploy optimize {self.folder} --flavour {flavour}")

    @property
    def processor_dir(self) -> Path:
        return self.folder / PROCESSOR_DIR

    @property
    def processor_read_by_transformers(self) -> str | None:
        """Why export found btdeploy's reading of the processor not transformers', or None."""
        why = self.data.get(PROCESSOR_READ_BY_TRANSFORMERS)
        return str(why) if why else None

    @property
    def config(self) -> StoredConfig:
        """The model config the export stored, read without transformers (which imports torch)."""
        try:
            return StoredConfig.from_export(self.data["model"]["config"])
        except ValueError as error:
            raise BtDeployError(
                f"{self.folder / MANIFEST_NAME} holds a config that is not a BridgeTower config ({error}): export again"
            ) from None

    def write(self) -> None:
        write_json(self.folder / MANIFEST_NAME, self.data)

    def record_graph(self, path: Path) -> None:
        """Remember a graph's size and hash, so a replaced or damaged file is refused at load."""
        self.data.setdefault("graphs", {})[path.name] = {"bytes": graph_bytes(path), "sha256": graph_sha256(path)}

    def record_step(self, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """After a step wrote a graph per stem: record each one's size and hash (in the manifest and in
        its summary) and return the whole head's summary with the split graphs' under `parts`."""
        for summary in summaries.values():
            self.record_graph(self.folder / summary["file"])
            summary.update(self.data["graphs"][summary["file"]])
        whole = summaries.pop("model")
        if summaries:
            whole["parts"] = summaries
        return whole

    def precision_record(self, flavour: str, precision: str) -> dict[str, Any] | None:
        """What `btdeploy quantize` recorded for this flavour and precision, if it ran."""
        record: dict[str, Any] | None = self.data.get("precisions", {}).get(f"{flavour}.{precision}")
        return record

    def made_by(self, source: Path, packages: tuple[str, ...], **more: Any) -> dict[str, Any]:
        """What a step's graph is made from: its source graph (name and recorded hash), the tool
        versions that made it, and anything else it depends on (calibration data, options)."""
        source_sha256 = self.data.get("graphs", {}).get(source.name, {}).get("sha256")
        return {"source": source.name, "source_sha256": source_sha256, "versions": tool_versions(packages), **more}

    def up_to_date(self, record: dict[str, Any] | None, made_by: dict[str, dict[str, Any]]) -> bool:
        """Whether a step's recorded graphs (one per stem, `made_by[stem]` how this run would make
        it) are still what this run would write: made from the same sources, data and tool
        versions, and each on disk exactly as recorded (full hash)."""
        if record is None:
            return False
        for stem, wanted in made_by.items():
            part = record if stem == "model" else record.get("parts", {}).get(stem)
            if part is None or wanted.get("source_sha256") is None:
                return False
            if any(part.get(key) != value for key, value in wanted.items()):
                return False
            if not self.graph_intact(self.folder / part["file"]):
                return False
        return True

    def graph_intact(self, path: Path) -> bool:
        """The graph exists and is the one recorded, byte for byte (a graph never recorded is not)."""
        if not path.is_file() or path.name not in self.data.get("graphs", {}):
            return False
        try:
            self.verify_graph(path, full=True)
        except (BtDeployError, OSError):
            return False
        return True

    def recorded_sha256(self, path: Path) -> str:
        """A graph's sha256 as its record holds it, where the file has the recorded size (what every
        load holds a graph to); hashed now where there is no record or the size differs. A base
        tower graph takes about 0.3 s to hash, which `rank` and `index` paid for each tower."""
        record = self.data.get("graphs", {}).get(path.name)
        if record is not None and record.get("sha256") and graph_bytes(path) == record.get("bytes"):
            return str(record["sha256"])
        return graph_sha256(path)

    def verify_graph(self, path: Path, full: bool = False) -> None:
        """Refuse a graph that is not the one recorded: its size always, its sha256 with `full`."""
        record = self.data.get("graphs", {}).get(path.name)
        if record is None:
            return  # written before btdeploy recorded graphs, or by hand: nothing to hold it to
        size = graph_bytes(path)
        if size != record["bytes"] or (full and graph_sha256(path) != record["sha256"]):
            what = f"{size} bytes, recorded {record['bytes']}" if size != record["bytes"] else "sha256 differs"
            writer = writer_of(self.folder)
            if writer:
                raise BtDeployError(
                    f"{path} is being written by another btdeploy step ({writer}): wait for it to finish, then "
                    "run this again"
                )
            raise BtDeployError(
                missing_weights_problem(path)
                or f"{path} is not the graph its manifest recorded ({what}): it was replaced or damaged; "
                "make it again (btdeploy export, optimize or quantize)"
            )


def weights_identity(manifest: Manifest) -> str | None:
    """The hash of the weights a head was exported from (None: exported before btdeploy recorded it)."""
    model = manifest.data["model"]
    identity = model.get("weights_sha256") or model.get("checkpoint_sha256")
    return str(identity) if identity is not None else None


def require_one_checkpoint(manifests: list[Manifest], why: str) -> None:
    """Heads a command uses together must be exports of one checkpoint (the same weight files):
    a head exported again from a fine-tune into the same folder beside an older one would
    otherwise be combined with it without a word (`why`: what combines them)."""
    groups: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        identity = weights_identity(manifest)
        if identity is None:
            continue  # exported before btdeploy recorded it: nothing to compare
        groups.setdefault(identity, []).append(manifest)
    if len(groups) < 2:
        return
    described = "; ".join(
        f"{', '.join(m.head for m in group)} from {group[0].data['model'].get('source')} "
        f"(seed {group[0].data['model'].get('seed')}, weights {identity[:12]})"
        for identity, group in groups.items()
    )
    raise BtDeployError(
        f"{why}, but they were exported from different checkpoints: {described}; "
        "export them again from one checkpoint (btdeploy export --heads ...)"
    )


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise BtDeployError(f"{folder} has no {MANIFEST_NAME}: export the head first (btdeploy export)")
    try:
        data = json.loads(path.read_text())
        _ = data["head"], data["model"]["config"], data["inputs"], data["outputs"]
        _check_names(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise BtDeployError(f"{path} is damaged ({error}); export the head again") from None
    return Manifest(folder, data)


def _check_names(data: dict[str, Any]) -> None:
    """Names in a manifest are names, never paths: every file btdeploy reads is named by its own
    vocabulary (graph_names), so a manifest cannot point outside its folder."""
    if not isinstance(data["head"], str) or Path(data["head"]).name != data["head"]:
        raise ValueError(f"head {data['head']!r} is not a name")
    for stem in data.get("split", {}):
        if stem not in STEMS[1:]:
            raise ValueError(f"unknown split graph {stem!r}")
    for name in data.get("graphs", {}):
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"graph name {name!r} is a path")


def head_folders(root: Path, heads: list[str] | None = None) -> list[Path]:
    """The exported head folders under an export folder (or the folder itself if it is one)."""
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        folders = [root]
    elif root.is_dir():
        folders = sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file())
    elif root.is_file():
        raise BtDeployError(
            f"{root} is a file: pass the folder btdeploy export wrote (the head folder {root.parent}, or the "
            "export folder above it); the graph is chosen by flavour and precision"
        )
    else:
        raise BtDeployError(
            f"{root} does not exist: pass the --out folder of btdeploy export (exported graphs, not a hub id "
            "or a checkpoint)"
        )
    if not folders and (root / "config.json").is_file():
        raise BtDeployError(
            f"{root} is a checkpoint, not an export: run btdeploy export --model {root} --out OUT, then pass OUT"
        )
    claimed: dict[str, Path] = {}
    for folder in folders:
        head = read_manifest(folder).head
        if head in claimed and len(folders) > 1:
            raise BtDeployError(
                f"{claimed[head]} and {folder} both hold the {head} head: keep one (btdeploy reads one folder per head)"
            )
        claimed[head] = folder
    if heads is not None:
        found = claimed
        missing = [h for h in heads if h not in found]
        if missing:
            raise BtDeployError(
                f"{root} has no exported head(s) {', '.join(missing)} (found: {', '.join(found) or 'none'}); "
                "export them with btdeploy export --heads"
            )
        folders = [found[h] for h in heads]
    if not folders:
        raise BtDeployError(f"{root} holds no exported heads: run btdeploy export --out {root}")
    return folders
