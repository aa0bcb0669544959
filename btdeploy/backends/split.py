"""The split graphs as one backend: text and vision towers, then the fusion graph, each opened on
its first use by the target that runs them (ONNX Runtime or OpenVINO)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.graph_names import Precision
from btdeploy.artifacts.manifest import Manifest
from btdeploy.backends.base import Backend
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.model.towers import PARTS as SPLIT_STEMS
from btdeploy.model.towers import assemble_outputs

# Opens one graph of a head: its file, and the inputs and outputs its manifest records for it.
GraphOpener = Callable[[Path, list[dict[str, Any]], list[dict[str, Any]]], Backend]


class SplitBackend:
    """Backend protocol over the three graphs: text and vision towers, then the fusion graph.

    Each graph is opened on its first use, so a caller that needs only towers never pays for the
    rest: the ranking's itc stage reads the two towers alone, `index` one (on base the itc fusion
    graph is 460 MB and a second and a half to open). The files are held to their manifest
    records before this is made, so a missing or damaged graph is still named at load."""

    def __init__(
        self,
        manifest: Manifest,
        paths: dict[str, Path],
        open_part: Callable[[str], Backend],
        engine: str,
        precision: Precision,
    ) -> None:
        self.manifest = manifest
        self.paths = paths
        self.precision = precision  # what its graphs compute in (the option: bf16 is OpenVINO's on FP32 graphs)
        self.parts: dict[str, Backend] = {}  # the graphs opened so far, by stem
        self._open_part = open_part
        self._opening = threading.Lock()  # two first requests at once open a graph once
        self.name = f"{engine}-split"
        self.description = ", ".join(paths[s].name for s in SPLIT_STEMS) + f" (split, {engine})"
        self._origins: dict[str, dict[str, Any]] = {}

    def part(self, stem: str) -> Backend:
        """The graph `stem` ("text", "vision" or "fusion"), opened on the first call."""
        opened = self.parts.get(stem)
        if opened is None:
            with self._opening:
                opened = self.parts.get(stem)
                if opened is None:
                    opened = self.parts[stem] = self._open_part(stem)
        return opened

    def origin(self, stem: str) -> dict[str, Any]:
        """What a tower's features come from: checkpoint, graph file and its hash (the manifest's
        record, read once per tower)."""
        if stem not in self._origins:
            self._origins[stem] = tower_origin(self.manifest, self.paths[stem])
        return self._origins[stem]

    def text(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.part("text").run({"input_ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"]})
        return {**values, "attention_mask": np.asarray(feeds["attention_mask"])}

    def vision(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.part("vision").run({"pixel_values": feeds["pixel_values"]})

    def fusion(self, text: Mapping[str, np.ndarray], image: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {
            "text_states": text["text_states"],
            "image_states": image["image_states"],
            "attention_mask": text["attention_mask"],
        }
        return self.part("fusion").run(feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text, image = self.text(feeds), self.vision(feeds)
        values = {**text, **image, **self.fusion(text, image)}
        return assemble_outputs(self.head, values)

    @property
    def head(self) -> HeadSpec:
        return get_head(self.manifest.head)


def tower_origin(manifest: Manifest, path: Path) -> dict[str, Any]:
    """What the features a tower graph makes come from: the checkpoint, the graph file and its hash
    (saved features and galleries record it; another graph's are refused)."""
    return {
        "config_sha256": manifest.data["model"]["config_sha256"],
        "source": manifest.data["model"]["source"],
        "graph": path.name,
        "graph_sha256": manifest.recorded_sha256(path),
    }


def split_paths(manifest: Manifest, options: Any) -> dict[str, Path]:
    """The three graphs of the flavour and precision `options` (RunOptions) name; each missing one
    is refused with the command that makes it."""
    if len(manifest.stems) == 1:
        raise BtDeployError(
            f"{manifest.folder} has no split graphs: export with btdeploy export --split to load with split=True"
        )
    return {stem: manifest.graph_path(options.flavour, options.precision, stem) for stem in SPLIT_STEMS}


def build_split_backend(manifest: Manifest, options: Any, open_graph: GraphOpener, engine: str) -> SplitBackend:
    """The three graphs under one backend, each held to its manifest record now (the full hash with
    `options.verify_hash`) and opened by the target's `open_graph` on its first use; `engine`
    names the target that opens them."""
    paths = split_paths(manifest, options)
    for path in paths.values():
        manifest.verify_graph(path, full=options.verify_hash)

    def open_part(stem: str) -> Backend:
        record = manifest.data["split"][stem]
        inputs, outputs = ([{"name": name} for name in record[side]] for side in ("inputs", "outputs"))
        return open_graph(paths[stem], inputs, outputs)

    return SplitBackend(manifest, paths, open_part, engine, options.precision)
