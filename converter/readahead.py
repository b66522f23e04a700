"""Reading a checkpoint ahead of its consumer, so the disk works while the CPU quantizes.

The consumer reads one tensor at a time (``Source.open_reader``). With the file in the page
cache, mapping its pages costs nothing. With the file on disk, each mapping waits for its pages,
fetched by the kernel's fault-time readahead in small requests, while nothing else happens; and on
the 2-core VM the converter was measured on, filling the page cache itself is the bottleneck:
reading 5.5 GB cold through it cost 17 CPU seconds of kernel time (0.31 GB/s), against 0.2 s and
1.56 GB/s for the same bytes read with ``O_DIRECT`` into reused buffers (bench/RESULTS.md).

``Readahead`` is a thread that walks the byte ranges a job will read, in the order it reads them,
at most ``budget`` bytes ahead of the consumer (``reached``). For each tensor it asks the kernel
which of its pages are in the page cache (``mincore``):

* **Mostly on disk** (and the filesystem takes ``O_DIRECT``): it reads the tensor's bytes with
  ``O_DIRECT`` into a span of one ring buffer of its own, past the page cache, and hands that
  span to the consumer (``take``). A span comes back when the last tensor viewing it is freed, so
  the kernel neither fills a page cache nor zeroes fresh memory for every tensor, and the bytes
  held (read ahead, or in the consumer's hands) stay within the ring's 256 MiB.
* **Resident** (or a filesystem without ``O_DIRECT``, such as tmpfs): it asks the kernel for each
  8 MiB chunk (``posix_fadvise(WILLNEED)``) and, a few chunks behind, touches one byte of each
  page through a mapping of its own, so the consumer's mapping finds the pages resident and
  touched. The consumer maps these tensors itself (``take`` returns ``None``).

It never changes a result. A range it cannot read (a file it cannot open, a short or failed
read) is left to the consumer's own read, which reports what is wrong exactly as it would have
without the thread (a truncated or damaged shard gives the same one-line error). Anything else
going wrong in the thread is a bug, raised in the consumer at its next ``reached``. ``close``
stops the thread and waits for it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .safetensors_format import TensorInfo
from .sink import DIRECT_ALIGN as _ALIGN

__all__ = ["Readahead", "DEFAULT_BUDGET", "resident_fraction"]

DEFAULT_BUDGET = 512 << 20  # bytes read ahead of the consumer at most; 0 turns reading ahead off
_RING = 256 << 20  # the one buffer O_DIRECT reads go into (process memory, unlike page cache)
_CHUNK = 8 << 20  # one request to the kernel, one mapping to touch
_DIRECT_REQUEST = 32 << 20  # one O_DIRECT read; the thread checks for ``close`` between them
_IN_FLIGHT = 64 << 20  # asked for, not yet touched: what the disk has queued while the thread waits
_DIRECT_MIN = 1 << 20  # smaller tensors go through the page cache: one O_DIRECT request each would cost more
_RESIDENT_ENOUGH = 0.8  # a tensor this much in the page cache is mapped, not read again from the disk
_PAGE = mmap.PAGESIZE
_ADVISE = getattr(os, "posix_fadvise", None)  # not on macOS: touching alone still overlaps
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every range goes through the page cache

_Key = tuple[Path, int, int]  # (file, begin, end): one tensor's bytes
_UNDECIDED = object()  # take(): the thread has not looked at this range yet


class Readahead:
    """A thread that reads ``order``'s byte ranges at most ``budget`` bytes ahead of the consumer.

    ``locate`` gives the path to open for a tensor's file, or ``None`` when it cannot be opened
    yet (a Hub shard still downloading, which arrives through the page cache anyway). Ranges
    that appear more than once (a fused group's parts are read twice) are read ahead once, and a
    buffer read for them is handed out on each of their reads.
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
        self._ranges: list[_Key] = []
        self._end_of: dict[_Key, int] = {}  # a range -> where it ends, in order bytes
        self._reads: dict[_Key, int] = {}  # a range -> how many times the consumer will read it
        position = 0
        for info in order:
            key = (info.file, info.begin, info.end)
            if not info.nbytes:
                continue
            self._reads[key] = self._reads.get(key, 0) + 1
            if key not in self._end_of:
                position += info.nbytes
                self._ranges.append(key)
                self._end_of[key] = position
        self._cond = threading.Condition()
        self._taken = 0  # order bytes the consumer has taken over
        self._stop = False
        self._done = False  # the thread has finished (or stopped): nothing more will be decided
        self._failure: BaseException | None = None
        self._decided: dict[_Key, torch.Tensor | None] = {}  # a read range's bytes; None: the consumer maps it
        self._ring = _Ring(min(budget, _RING), self._freed)
        self._mapped_only: set[Path] = set()  # files whose O_DIRECT reads the filesystem refused
        self.peak_ahead = 0  # the most bytes ever asked for past the consumer: at most ``budget``
        self.direct_bytes = 0  # bytes read past the page cache
        self.own_buffers = 0  # reads the ring had no room for (the consumer was waiting for them)
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
                    self._cond.notify_all()

    def take(self, info: TensorInfo) -> torch.Tensor | None:
        """``info``'s bytes (uint8) if the thread read them past the page cache, else ``None``: map them.

        Waits while the thread has yet to decide about ``info`` (it reads in order, and ``reached``
        has just let it go as far as ``info``); a range it never reaches (a stopped thread, an
        unknown range) is the consumer's to map.
        """
        key = (info.file, info.begin, info.end)
        if key not in self._reads:
            return None
        with self._cond:
            while (got := self._decided.get(key, _UNDECIDED)) is _UNDECIDED and not self._done:
                self._cond.wait()
            if got is _UNDECIDED or got is None:
                return None
            self._reads[key] -= 1
            if self._reads[key] <= 0:  # its last read: the consumer holds the only reference
                self._decided[key] = None
            return got[info.begin % _ALIGN:][: info.nbytes]

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (at most one request's I/O); safe to repeat."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            self._decided.clear()  # buffers nobody took go back (the consumer keeps what it took)
        self._ring.close()

    def _freed(self) -> None:
        """Ring space came back (a tensor was freed, in whichever thread): the thread may read on."""
        with self._cond:
            self._cond.notify_all()

    # --- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        files: dict[Path, tuple[int, int] | None] = {}  # path -> (fd, O_DIRECT fd or -1)
        try:
            self._walk(files)
        except OSError:
            pass  # a hint failed; the consumer's own read reports whatever is wrong with the file
        except BaseException as e:  # noqa: BLE001 - a bug: raised in the consumer by reached()
            self._failure = e
        finally:
            for fds in files.values():
                for fd in fds or ():
                    if fd >= 0:
                        os.close(fd)
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _open(self, files: dict[Path, tuple[int, int] | None], path: Path) -> tuple[int, int] | None:
        if path not in files:
            located = self._locate(path)
            if located is None:
                files[path] = None
            else:
                fd = os.open(located, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                files[path] = (fd, _open_direct(located))
        return files[path]

    def _walk(self, files: dict[Path, tuple[int, int] | None]) -> None:
        asked: deque[tuple[int, int, int, int]] = deque()  # (fd, begin, end, its end in order bytes)
        position = 0  # where the current range starts, in order bytes
        for key in self._ranges:
            path, begin, end = key
            fds = self._open(files, path)
            direct = fds is not None and fds[1] >= 0 and end - begin >= _DIRECT_MIN and path not in self._mapped_only
            if direct and resident_fraction(fds[0], begin, end) < _RESIDENT_ENOUGH:
                if not self._read_direct(key, fds[1], asked):
                    return
            else:
                self._decide(key, None)
                if fds is not None and not self._advise(fds[0], begin, end, position, asked):
                    return
            position += end - begin
        while asked and not self._stop:
            self._touch(*asked.popleft())

    def _decide(self, key: _Key, data: torch.Tensor | None) -> None:
        with self._cond:
            self._decided[key] = data
            self._cond.notify_all()

    def _wait_for_room(self, ahead: int, asked: deque[tuple[int, int, int, int]]) -> bool:
        """Wait until reading up to ``ahead`` is within the budget, touching what is on its way
        meanwhile; False on close. A range the consumer has reached goes at once."""
        while True:
            with self._cond:
                if self._stop:
                    return False
                if ahead <= self._taken + self.budget:
                    return True
                if not asked:
                    self._cond.wait()
                    continue
            self._touch(*asked.popleft())

    def _lend(self, ahead: int, length: int) -> tuple[torch.Tensor, int] | None:
        """Ring space for ``length`` bytes, waiting for the consumer to free some while it is not
        waiting for this range itself (then a buffer of its own); ``None`` on close."""
        with self._cond:  # a free notifies under this lock, so none is missed between trying and waiting
            while True:
                lent = self._ring.lend(length)
                if lent is not None:
                    return lent
                if self._stop:
                    return None
                if ahead <= self._taken:  # the consumer waits for it: never wait on the consumer
                    self.own_buffers += 1
                    return _own_buffer(length)
                self._cond.wait()  # woken by a free and by the consumer reaching a range

    def _read_direct(self, key: _Key, fd: int, asked: deque[tuple[int, int, int, int]]) -> bool:
        """Read one range with ``O_DIRECT`` into a buffer for ``take``; False when closed."""
        _, begin, end = key
        ahead = self._end_of[key]
        start = begin - begin % _ALIGN
        length = -(-(end - start) // _ALIGN) * _ALIGN
        if not self._wait_for_room(ahead, asked):
            return False
        lent = self._lend(ahead, length)
        if lent is None:
            return False
        if ahead < self._taken:  # the consumer is past it and mapped it itself
            self._decide(key, None)
            return True
        buffer, address = lent
        self.peak_ahead = max(self.peak_ahead, ahead - self._taken)
        got = 0
        try:
            while got < end - start:
                if self._stop:
                    return False
                n = min(_DIRECT_REQUEST, length - got)
                read = os.preadv(fd, [(ctypes.c_char * n).from_address(address + got)], start + got)
                if read <= 0:
                    break  # the file is shorter than its header says: the consumer will say so
                got += read
        except OSError as e:
            got = 0  # an I/O error: the consumer's own read reports it
            if e.errno == errno.EINVAL:  # the device wants larger alignment: this file goes through the page cache
                self._mapped_only.add(key[0])
        if got < end - start:
            self._decide(key, None)
        else:
            self.direct_bytes += end - begin
            self._decide(key, buffer)
        return True

    def _advise(self, fd: int, begin: int, end: int, position: int, asked: deque[tuple[int, int, int, int]]) -> bool:
        """Ask for one range through the page cache, chunk by chunk; False when closed."""
        for lo in range(begin, end, _CHUNK):
            hi = min(lo + _CHUNK, end)
            ahead = position + hi - begin
            if not self._wait_for_room(ahead, asked):
                return False
            if ahead <= self._taken:
                continue  # the consumer got here first
            if _ADVISE is not None:
                _ADVISE(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)  # queues the read and returns
            self.peak_ahead = max(self.peak_ahead, ahead - self._taken)
            asked.append((fd, lo, hi, ahead))
            if len(asked) * _CHUNK > _IN_FLIGHT:
                self._touch(*asked.popleft())
        return True

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


class _Ring:
    """One page-aligned buffer that ``O_DIRECT`` reads fill front to back, reused as tensors die.

    A fresh 75 MB buffer per tensor costs the kernel a zeroed page per 4 KiB (measured: 2 s of
    system time for 5.5 GB, and 1.0 instead of 1.56 GB/s); this buffer is faulted in once. Each
    read gets the first free span at or after the previous one, wrapping around, as a stream
    consumes them; a span the consumer keeps longer is stepped over. A lent span is a ctypes
    array over the buffer, which torch's tensor keeps alive through its storage whatever views
    are taken, and whose finaliser (in whichever thread frees the last view) frees the span. The
    bytes lent never exceed ``capacity``.
    """

    def __init__(self, capacity: int, on_free: Callable[[], None]) -> None:
        self.capacity = capacity - capacity % _ALIGN
        self._on_free = on_free
        self._lock = threading.RLock()  # a span freed by a garbage collection that runs while lending
        self._memory: torch.Tensor | None = None
        self._base = 0
        self._live: dict[int, int] = {}  # start -> end of each lent span
        self._cursor = 0  # where the last span ended: the next is placed from here on
        self._closed = False

    def lend(self, length: int) -> tuple[torch.Tensor, int] | None:
        """A uint8 tensor of ``length`` bytes (a multiple of the alignment) and its address, or
        ``None`` when the ring has no room for it now."""
        with self._lock:
            start = self._place(length)
            if start is None:
                return None
            if self._memory is None:
                self._memory = torch.empty(self.capacity + _ALIGN, dtype=torch.uint8)
                self._base = self._memory.data_ptr() + (-self._memory.data_ptr()) % _ALIGN
            self._live[start] = self._cursor = start + length
        window = (ctypes.c_char * length).from_address(self._base + start)
        weakref.finalize(window, self._give_back, start, self._memory)  # the memory lives while a span does
        return torch.frombuffer(window, dtype=torch.uint8), self._base + start

    def _place(self, length: int) -> int | None:
        """The first gap of ``length`` bytes from the cursor on, wrapping around once."""
        if self._closed or length > self.capacity:
            return None
        spans = sorted(self._live.items())
        gaps = []
        previous = 0
        for start, end in spans:
            gaps.append((previous, start))
            previous = end
        gaps.append((previous, self.capacity))
        for lo, hi in sorted(gaps, key=lambda gap: (gap[1] <= self._cursor, gap[0])):
            lo = max(lo, self._cursor) if hi > self._cursor >= lo else lo
            if hi - lo >= length:
                return lo
        return None

    def _give_back(self, start: int, _memory: torch.Tensor) -> None:
        with self._lock:
            self._live.pop(start, None)
        if not sys.is_finalizing():
            self._on_free()

    def close(self) -> None:
        """Lend no more; the memory goes when the last lent span does."""
        with self._lock:
            self._closed = True
            self._memory = None


def _own_buffer(length: int) -> tuple[torch.Tensor, int]:
    """A buffer outside the ring (aligned), for a read the consumer waits for when the ring is full."""
    memory = torch.empty(length + _ALIGN, dtype=torch.uint8)
    offset = (-memory.data_ptr()) % _ALIGN
    return memory[offset:offset + length], memory.data_ptr() + offset


def _open_direct(path: Path) -> int:
    """A second descriptor with ``O_DIRECT``, or -1 where the platform or filesystem has none."""
    if not _O_DIRECT:
        return -1
    try:
        return os.open(path, os.O_RDONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # tmpfs and friends
            return -1
        raise


def resident_fraction(fd: int, begin: int, end: int) -> float:
    """How much of ``[begin, end)`` of an open file is in the page cache (``mincore``); 1.0 when
    it cannot be told (not Linux, or the mapping failed), which leaves the range to the mapped path."""
    if _LIBC is None:
        return 1.0
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    length = end - start
    address = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address in (None, ctypes.c_void_p(-1).value):
        return 1.0
    try:
        vector = ctypes.create_string_buffer(-(-length // _PAGE))
        if _LIBC.mincore(ctypes.c_void_p(address), length, vector) != 0:
            return 1.0
    finally:
        _LIBC.munmap(ctypes.c_void_p(address), length)
    raw = vector.raw
    first = (begin - start) // _PAGE
    pages = raw[first:]
    return 1.0 - pages.count(0) / max(len(pages), 1)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
