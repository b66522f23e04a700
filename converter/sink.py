"""Writing big files fast: past the page cache where possible, hashed on the side.

``FileSink`` writes a new file front to back. Where the filesystem supports ``O_DIRECT`` it stages
bytes in a page-aligned buffer and writes them straight to the device: the kernel then spends no
CPU filling and flushing page cache (measured on a 2-core VM: 2.8 GB written in 0.9 s with 0.07 s
of system time, against 2.9-3.9 s and 2.4-3.3 s buffered). Elsewhere (tmpfs, other platforms) it
writes through the page cache as usual. The file's bytes are the same either way.

``BackgroundHash`` feeds SHA-256 from a thread of its own, so hashing overlaps the writes.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["FileSink", "BackgroundHash", "DIRECT_ALIGN"]

DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses aligned to the device's block size
_STAGING_BYTES = 16 << 20


class FileSink:
    """A new file, written sequentially from uint8 tensors; ``direct=False`` forces the page cache."""

    def __init__(self, path: str | Path, *, direct: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self.path = Path(path)
        self.size = 0
        self.direct = False
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                    raise
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        if self.direct:
            self._region = mmap.mmap(-1, _STAGING_BYTES)  # anonymous maps are page-aligned
            self._staging = torch.frombuffer(self._region, dtype=torch.uint8)
            self._fill = 0

    def write(self, data: torch.Tensor) -> None:
        """Append a 1-D uint8 CPU tensor's bytes; a failed write raises ``OSError`` naming the file."""
        try:
            self._write(data)
        except OSError as e:
            raise _named(e, self.path) from None

    def _write(self, data: torch.Tensor) -> None:
        n = data.numel()
        if not self.direct:
            _write_all(self._fd, memoryview(data.numpy()))
        else:
            pos = 0
            while pos < n:
                take = min(n - pos, _STAGING_BYTES - self._fill)
                self._staging[self._fill : self._fill + take].copy_(data[pos : pos + take])
                self._fill += take
                pos += take
                if self._fill == _STAGING_BYTES:
                    self._flush(_STAGING_BYTES)
        self.size += n

    def _flush(self, length: int) -> None:
        view = memoryview(self._region)[:length]
        try:
            _write_all(self._fd, view)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            import fcntl  # POSIX only, like O_DIRECT itself

            # Opened with O_DIRECT but the filesystem refuses these writes: drop the flag and retry.
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(self._fd, view)
        finally:
            view.release()
        self._fill = 0

    def close(self) -> None:
        """Write what is staged (padded to the block size, then truncated back) and close."""
        if self._fd < 0:
            return
        try:
            if self.direct and self._fill:
                padded = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
                self._staging[self._fill : padded].zero_()
                self._flush(padded)
                os.ftruncate(self._fd, self.size)
            fd, self._fd = self._fd, -1
            os.close(fd)  # a delayed write error (NFS, quotas) surfaces here
        except OSError as e:
            raise _named(e, self.path) from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing what is staged (the caller discards the file). Safe to repeat."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass  # the file is being discarded; the error that got us here is the one to report
        if self.direct:
            self.direct = False
            self._staging = None
            try:
                self._region.close()
            except BufferError:
                pass  # a view of it is still alive (in a traceback); it is freed with that view


def _named(e: OSError, path: Path) -> OSError:
    """The same error with the file it happened to, so the message can say where."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


class BackgroundHash:
    """SHA-256 fed from a thread of its own (hashlib releases the GIL on large chunks).

    Chunks are hashed in the order given; the bounded queue keeps at most a few alive, and each
    chunk's ``on_done`` runs once it is hashed, so its memory can be reused.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[tuple[memoryview, Callable[[], None] | None] | None] = queue.Queue(2)
        self._digest: str | None = None
        self._thread = threading.Thread(target=self._run, name="omni-fp8-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            chunk, on_done = item
            self._sha.update(chunk)
            del chunk, item
            if on_done is not None:
                on_done()

    def update(self, chunk: memoryview, on_done: Callable[[], None] | None = None) -> None:
        self._queue.put((chunk, on_done))

    def hexdigest(self) -> str:
        if self._digest is None:
            self._queue.put(None)
            self._thread.join()
            self._digest = self._sha.hexdigest()
        return self._digest
