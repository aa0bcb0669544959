"""The split graphs as one backend: text and vision towers, then the fusion graph, on ONNX Runtime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest
from btdeploy.artifacts.onnx_files import graph_sha256
from btdeploy.backends.base import Backend
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.model.towers import PARTS as SPLIT_STEMS
from btdeploy.model.towers import assemble_outputs


class SplitBackend:
    """Backend protocol over the three graphs: text and vision towers, then the fusion graph."""

    name = "onnxruntime-split"

    def __init__(self, manifest: Manifest, parts: dict[str, Backend], paths: dict[str, Path]) -> None:
        self.manifest = manifest
        self.parts = parts
        self.paths = paths
        self.description = ", ".join(paths[s].name for s in SPLIT_STEMS) + " (split)"
        self._origins: dict[str, dict[str, Any]] = {}

    def origin(self, stem: str) -> dict[str, Any]:
        """What a tower's features come from: checkpoint, graph file and its hash. Hashed once per
        tower, not on every encode or score (a base tower graph is hundreds of MB)."""
        if stem not in self._origins:
            path = self.paths[stem]
            self._origins[stem] = {
                "config_sha256": self.manifest.data["model"]["config_sha256"],
                "source": self.manifest.data["model"]["source"],
                "graph": path.name,
                "graph_sha256": graph_sha256(path),
            }
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


def build_split_backend(manifest: Manifest, options: Any) -> SplitBackend:
    """The three graphs under one backend; `options` are the onnxruntime target's RunOptions."""
    from btdeploy.backends.onnxruntime import open_recorded_graph

    if len(manifest.stems) == 1:
        raise BtDeployError(
            f"{manifest.folder} has no split graphs: export with btdeploy export --split to load with split=True"
        )
    parts: dict[str, Backend] = {}
    paths = {stem: manifest.graph_path(options.flavour, options.precision, stem) for stem in SPLIT_STEMS}
    for stem, path in paths.items():
        record = manifest.data["split"][stem]
        inputs, outputs = ([{"name": name} for name in record[side]] for side in ("inputs", "outputs"))
        parts[stem] = open_recorded_graph(manifest, path, inputs, outputs, options)
    return SplitBackend(manifest, parts, paths)
