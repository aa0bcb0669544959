"""A /v1/rank or /v1/search request's images for the shared ranking (`apps/rank.py`): decoded from the request's
bytes, and each tower's features kept in the replica's cache by the image's content hash, so an
image seen before runs no tower."""

from __future__ import annotations

from typing import Any

import numpy as np

from btdeploy.apps.rank import ItemReader
from btdeploy.model.media import image_inputs
from btdeploy.runtime.runtime import SplitRuntime
from btdeploy.runtime.split_runtime import Features
from btdeploy.serve.feature_cache import FeatureCache, content_key
from btdeploy.serve.tasks import decode_image


class RequestImages(ItemReader):
    """One request's images (made per request: it counts what that request found in the cache)."""

    def __init__(self, processor: Any, cache: FeatureCache) -> None:
        super().__init__(processor)
        self.cache = cache
        self.encoded: set[str] = set()  # the images a tower ran on in this request

    def label(self, item: Any, index: int) -> str:
        return f"image {index}"

    def pictures(self, items: list[Any], first: int) -> list[Any]:
        return [decode_image(data, first + row, self.processor.image_processor) for row, data in enumerate(items)]

    def pixels(self, items: list[Any], first: int) -> np.ndarray:
        self.encoded.update(content_key(data) for data in items)  # a whole head runs their tower again
        return super().pixels(items, first)

    def image_features(
        self, runtime: SplitRuntime, items: list[Any], first: int, embeddings_only: bool = False
    ) -> Features:
        """Each image's features for this runtime's head: from the cache, or its tower run once (an
        image given twice in a request included). A cache entry holds every head's for the image,
        whole: the itm stage reads the itc head's states where the heads share towers."""
        head = runtime.head.name
        keys = [content_key(data) for data in items]
        entries: dict[str, dict[str, Features]] = {key: dict(self.cache.get(key) or {}) for key in dict.fromkeys(keys)}
        missing = [key for key, entry in entries.items() if head not in entry]
        if missing:
            rows = [keys.index(key) for key in missing]
            image_processor = self.processor.image_processor
            pictures = [decode_image(items[row], first + row, image_processor) for row in rows]
            encoded = runtime.encode_images(image_inputs(self.processor, pictures))
            for position, key in enumerate(missing):
                entries[key][head] = encoded[position]
                self.cache.put(key, entries[key])
            self.encoded.update(missing)
        return Features.concat([entries[key][head] for key in keys])

    def found_in_cache(self, images: list[bytes]) -> int:
        """How many of the request's images ran no tower in it."""
        return sum(content_key(data) not in self.encoded for data in images)
