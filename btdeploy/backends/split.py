"""The split graphs as one backend: text and vision towers, then the fusion graph, each opened by
the target that runs them (ONNX Runtime or OpenVINO)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest
from btdeploy.backends.base import Backend
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.model.towers import PARTS as SPLIT_STEMS
from btdeploy.model.towers import assemble_outputs

# Opens one graph of a head: its file, and the inputs and outputs its manifest records for it.
GraphOpener = Callable[[Path, list[dict[str, Any]], list[dict[str, Any]]], Backend]


class SplitBackend:
    """Backend protocol over the three graphs: text and vision towers, then the fusion graph."""

    def __init__(self, manifest: Manifest, parts: dict[str, Backend], paths: dict[str, Path]) -> None:
        self.manifest = manifest
        self.parts = parts
        self.paths = paths
        self.name = f"{parts['fusion'].name}-split"
        self.description = ", ".join(paths[s].name for s in SPLIT_STEMS) + f" (split, {parts['fusion'].name})"
        self._origins: dict[str, dict[str, Any]] = {}

    def origin(self, stem: str) -> dict[str, Any]:
        """What a tower's features come from: checkpoint, graph file and its hash (the manifest's
        record, read once per tower)."""
        if stem not in self._origins:
            self._origins[stem] = tower_origin(self.manifest, self.paths[stem])
        return self._origins[stem]

    def text(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.parts["text"].run({"input_ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"]})
        return {**values, "attention_mask": np.asarray(feeds["attention_mask"])}

    def vision(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.parts["vision"].run({"pixel_values": feeds["pixel_values"]})

    def fusion(self, text: Mapping[str, np.ndarray], image: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {
            "text_states": text["text_states"],
            "image_states": image["image_states"],
            "attention_mask": text["attention_mask"],
        }
        return self.parts["fusion"].run(feeds)

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


def build_split_backend(manifest: Manifest, options: Any, open_graph: GraphOpener) -> SplitBackend:
    """The three graphs under one backend, each opened by the target's `open_graph`."""
    paths = split_paths(manifest, options)
    parts: dict[str, Backend] = {}
    for stem, path in paths.items():
        record = manifest.data["split"][stem]
        inputs, outputs = ([{"name": name} for name in record[side]] for side in ("inputs", "outputs"))
        parts[stem] = open_graph(path, inputs, outputs)
    return SplitBackend(manifest, parts, paths)
