"""A bounded cache of image features keyed by the image's content hash (least recently used goes first)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    """Safe to share between threads: the rank endpoint runs each request in a worker thread, and a
    key found by one could be evicted by another before it was moved to the end (a KeyError)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key]
            self.misses += 1
            return None

    def put(self, key: str, value: Any) -> None:
        if self.capacity <= 0:
            return
        with self.lock:
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)
