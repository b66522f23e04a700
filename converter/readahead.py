"""Reading a checkpoint ahead of its consumer, so the disk works while the CPU quantizes.

The reader maps one tensor at a time (``read_tensor``). With the file in the page cache that
costs nothing; with the file on disk, each mapping waits for its pages, fetched by the kernel's
fault-time readahead in small requests, one tensor at a time, while nothing else happens. On the
2-core VM the converter was measured on, pages the disk has just filled also cost the first
thread that touches them a stall per page, which the quantizer then paid inside its arithmetic
(twice the CPU time of a warm run).

``Readahead`` is a thread that walks the byte ranges a job will read, in the order it reads them,
and keeps the next ``budget`` bytes on their way: it asks the kernel for each 8 MiB chunk
(``posix_fadvise(WILLNEED)``: large requests, many in flight) and, a few chunks behind, touches one
byte of each page through a mapping of its own, so the consumer finds the pages resident and
already touched. It never asks for a byte more than ``budget`` past what the consumer has taken
(``reached``), and it holds no tensor data: what it reads sits in the page cache, which the kernel
may reclaim, and its own mapping is one chunk, unmapped before the next.

It only ever hints. A file it cannot open or map is left alone, and the consumer's own read
reports what is wrong exactly as it would have without it (a truncated or damaged shard gives the
same one-line error). Anything else going wrong in the thread is a bug, raised in the consumer at
its next ``reached``. ``close`` stops the thread and waits for it.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .safetensors_format import TensorInfo

__all__ = ["Readahead", "DEFAULT_BUDGET"]

DEFAULT_BUDGET = 512 << 20  # page cache filled ahead of the consumer at most; 0 turns reading ahead off
_CHUNK = 8 << 20  # one request to the kernel, one mapping to touch
_IN_FLIGHT = 64 << 20  # asked for, not yet touched: what the disk has queued while the thread waits
_PAGE = mmap.PAGESIZE
_ADVISE = getattr(os, "posix_fadvise", None)  # not on macOS: touching alone still overlaps


class Readahead:
    """A thread that reads ``order``'s byte ranges at most ``budget`` bytes ahead of the consumer.

    ``locate`` gives the path to open for a tensor's file, or ``None`` when it cannot be opened
    yet (a Hub shard still downloading, which arrives through the page cache anyway). Ranges
    that appear twice (a fused group's parts are read twice) are read ahead once.
    """

    def __init__(
        self,
        order: Sequence[TensorInfo],
        *,
        budget: int = DEFAULT_BUDGET,
        locate: Callable[[Path], Path | None] = lambda path: path,
    ) -> None:
        self.budget = budget
        self._locate = locate
        self._ranges: list[tuple[Path, int, int]] = []
        self._end_of: dict[tuple[Path, int, int], int] = {}  # a range -> where it ends, in order bytes
        position = 0
        for info in order:
            key = (info.file, info.begin, info.end)
            if info.nbytes and key not in self._end_of:
                position += info.nbytes
                self._ranges.append(key)
                self._end_of[key] = position
        self._cond = threading.Condition()
        self._taken = 0  # order bytes the consumer has taken over
        self._stop = False
        self._failure: BaseException | None = None
        self.peak_ahead = 0  # the most bytes ever asked for past the consumer: at most ``budget``
        self._thread = threading.Thread(target=self._run, name="omni-fp8-readahead", daemon=True)
        self._thread.start()

    def reached(self, info: TensorInfo) -> None:
        """The consumer is about to read ``info``: everything up to its end is the consumer's now."""
        if self._failure is not None:
            raise self._failure
        end = self._end_of.get((info.file, info.begin, info.end))
        if end is not None:
            with self._cond:
                if end > self._taken:
                    self._taken = end
                    self._cond.notify()

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (at most one chunk's I/O); safe to repeat."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    # --- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        files: dict[Path, int | None] = {}
        try:
            self._walk(files)
        except OSError:
            pass  # a hint failed; the consumer's own read reports whatever is wrong with the file
        except BaseException as e:  # noqa: BLE001 - a bug: raised in the consumer by reached()
            self._failure = e
        finally:
            for fd in files.values():
                if fd is not None:
                    os.close(fd)

    def _walk(self, files: dict[Path, int | None]) -> None:
        asked: deque[tuple[int, int, int, int]] = deque()  # (fd, begin, end, its end in order bytes)
        position = 0  # where the current range starts, in order bytes
        for path, begin, end in self._ranges:
            if path not in files:
                located = self._locate(path)
                files[path] = None if located is None else os.open(located, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fd = files[path]
            if fd is None:  # cannot be opened yet
                position += end - begin
                continue
            for lo in range(begin, end, _CHUNK):
                hi = min(lo + _CHUNK, end)
                ahead = position + hi - begin
                while True:  # over the budget: touch what is on its way, else wait for the consumer
                    with self._cond:
                        if self._stop:
                            return
                        if ahead <= self._taken + self.budget:
                            break
                        if not asked:
                            self._cond.wait()
                            continue
                    self._touch(*asked.popleft())
                if ahead <= self._taken:
                    continue  # the consumer got here first
                if _ADVISE is not None:
                    _ADVISE(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)  # queues the read and returns
                self.peak_ahead = max(self.peak_ahead, ahead - self._taken)
                asked.append((fd, lo, hi, ahead))
                if len(asked) * _CHUNK > _IN_FLIGHT:
                    self._touch(*asked.popleft())
            position += end - begin
        while asked and not self._stop:
            self._touch(*asked.popleft())

    def _touch(self, fd: int, begin: int, end: int, ahead: int) -> None:
        """Load one byte of every page of ``[begin, end)``: waits for their I/O and pays the first touch."""
        if ahead <= self._taken or os.fstat(fd).st_size < end:
            return  # the consumer has it already, or the file shrank (the consumer will say so)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            # Private and writable, so torch takes it without a warning (silencing one is not
            # thread-safe); nothing writes to it, so it maps the page cache's own pages.
            region = mmap.mmap(fd, end - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=start)
        except ValueError:  # the file shrank since fstat
            return
        try:
            pages = torch.frombuffer(region, dtype=torch.uint8)[::_PAGE]
            pages.sum()  # one load per page, in torch's kernel, which releases the GIL
            del pages
        finally:
            region.close()
