"""The gallery a rank replica searches (`serve --gallery`), read again when `btdeploy index` replaces
its file, so a server searches the images indexed since it started without a restart. `index`
renames a complete file into place, so a read sees the old gallery or the new one, whole."""

from __future__ import annotations

import threading
from pathlib import Path

from btdeploy.apps.gallery import Gallery, GalleryFault
from btdeploy.errors import BtDeployError
from btdeploy.progress import say


class ServedGallery:
    """The gallery at `path` as it is now. Its kind stays what it was at start: the gateway decided
    then which query /v1/search takes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._gallery = Gallery.load(path)
        self.kind = self._gallery.kind
        self.reads = 1  # times the file was read: at start, then once per replacement
        self._reading = threading.Lock()  # searches run in worker threads: one reads a replacement, the rest wait

    def _stat(self) -> tuple[int, int, int]:
        """What changes when the file is replaced or written (a stat per request: microseconds)."""
        try:
            stat = self.path.stat()
        except OSError as error:
            raise GalleryFault(
                f"--gallery {self.path} cannot be read since the server started ({error.strerror}): "
                "index again to that path"
            ) from None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def current(self) -> Gallery:
        """The gallery, read again if its file changed since the last read; a replacement this
        server cannot search is refused (each request looks again, so mending the file mends the server)."""
        if self._stat() == self._stamp:
            return self._gallery
        with self._reading:
            stamp = self._stat()
            if stamp == self._stamp:  # another search read it meanwhile
                return self._gallery
            try:
                gallery = Gallery.load(self.path)
            except BtDeployError as error:
                raise GalleryFault(f"{error} (the file was replaced since the server started)") from None
            if gallery.kind != self.kind:
                raise GalleryFault(
                    f"--gallery {self.path} now holds {gallery.kind}s, this server searches {self.kind}s: index "
                    f"{self.kind}s to that path, or restart the server to search the new gallery"
                )
            self._gallery, self._stamp = gallery, stamp
            self.reads += 1
        say(f"search: {self.path} read again: {len(gallery.names)} {gallery.kind}(s)")
        return gallery
