"""transformers imported one thread at a time.

transformers resolves `from transformers import X` through a lazy module that is not safe across
threads: loading two heads at once (btdeploy.load from a thread pool) failed with `ImportError:
cannot import name 'BridgeTowerConfig'`. Every import of transformers in btdeploy runs inside
`transformers_imports()` (tests/test_architecture.py holds it to that); once a name has been
resolved, holding the lock costs next to nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()  # re-entrant: an import inside may reach another helper that takes it


@contextmanager
def transformers_imports() -> Iterator[None]:
    with _LOCK:
        yield
