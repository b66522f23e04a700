"""Where a conversion's output goes: what counts as ours, the staging folder, the atomic publish.

Two promises live here. A failed or interrupted run never leaves an output that looks complete:
everything is written into a hidden staging folder beside ``OUT`` and renamed into place only
when finished. And nothing omni-fp8 did not write is ever deleted: ``force`` replaces ``OUT``
only if it is an earlier output, which means a folder whose ``fp8_manifest.json`` parses and
lists every file in it (an empty folder qualifies too, having nothing to lose). The check runs
when the conversion starts and again at publish, on the folder actually being replaced, and
publishing never renames over a path that appeared in between: it refuses instead.

Single-file outputs (``--target comfyui``, ``--target diffusers``) follow the same rules: the file
is written inside the same hidden staging folder and renamed into place, and ``force`` replaces
only a file whose safetensors header is valid and embeds an omni-fp8 record listing exactly the
tensors it holds (``manifest.read_file_record``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, CorruptCheckpointError, OutputExistsError, SourceNotFoundError
from .filenames import MANIFEST_NAME
from .manifest import read_file_record, read_manifest
from .safetensors_format import read_header
from .writer import hash_file

__all__ = [
    "Existing", "check_output", "staging_folder", "publish", "unlisted_files", "check_output_file", "publish_file",
    "is_unfinished",
]

_STAGING_MARK = ".omni-fp8-partial-"
_REPLACED_MARK = ".omni-fp8-replaced-"
_OWNER_FILE = ".omni-fp8-owner.json"


@dataclass(frozen=True)
class Existing:
    """The folder at ``OUT`` that a run may replace, as it was when checked: its identity."""

    device: int
    inode: int
    empty: bool


def check_output(out: Path, source_root: Path, *, force: bool) -> Existing | None:
    """Refuse an output that overlaps the source or that ``force`` may not replace.

    Returns ``None`` when ``OUT`` does not exist, else the identity of the folder that
    ``publish`` may replace (an empty folder, or with ``force`` an earlier omni-fp8 output).
    """
    out_r, src_r = out.resolve(), source_root.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise OutputExistsError(
            f"{out}: the output overlaps the source {source_root}; choose a folder outside it.", path=out
        )
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise OutputExistsError(
            f"{out}: is a symbolic link; give the folder it points to, or a new path.", path=out
        )
    if stat.S_ISDIR(st.st_mode) and _is_empty(out):
        return Existing(st.st_dev, st.st_ino, empty=True)  # nothing to lose
    if not force:
        raise OutputExistsError(f"{out}: already exists; pass --force (force=True) to replace it.", path=out)
    _check_replaceable(out)
    return Existing(st.st_dev, st.st_ino, empty=False)


def _check_replaceable(out: Path) -> None:
    """``out`` must be an earlier omni-fp8 output: a manifest that parses and lists every file."""
    if not out.is_dir():
        raise _not_ours(out, "it is a file, not a folder")
    if not (out / MANIFEST_NAME).is_file():
        raise _not_ours(out, f"it has no {MANIFEST_NAME}")
    try:
        manifest = read_manifest(out)
    except (CorruptCheckpointError, SourceNotFoundError) as e:
        raise _not_ours(out, f"its {MANIFEST_NAME} is not a valid omni-fp8 manifest") from e
    extra = unlisted_files(out, manifest["files"])
    if extra:
        more = f", and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise _not_ours(out, f"it holds files its manifest does not list ({', '.join(extra[:3])}{more})")
    card = _card_not_ours(out, manifest)
    if card:
        raise _not_ours(out, card)


def _card_not_ours(out: Path, manifest: dict) -> str | None:
    """A model card that ``push`` kept (the user's) or that was edited since omni-fp8 wrote it is the
    user's writing: listed in the manifest, but not ours to delete."""
    card = manifest.get("model_card")
    if card is None:
        return None
    if card["written_by"] != "omni-fp8":
        return f"its model card {card['path']} was written by you, not by omni-fp8"
    path = out / card["path"]
    if path.is_file() and hash_file(path).sha256 != manifest["files"][card["path"]]["sha256"]:
        return f"its model card {card['path']} was edited after omni-fp8 wrote it"
    return None


def unlisted_files(folder: Path, listed: object) -> list[str]:
    """Everything under ``folder`` that is neither the manifest nor listed (links are not followed)."""
    names = set(listed) if isinstance(listed, dict) else set()
    extra = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                extra.append((here / name).relative_to(folder).as_posix())
        for name in filenames:
            rel = (here / name).relative_to(folder).as_posix()
            if rel != MANIFEST_NAME and rel not in names:
                extra.append(rel)
    return sorted(extra)


def _not_ours(out: Path, why: str) -> OutputExistsError:
    return OutputExistsError(
        f"{out}: exists and is not an omni-fp8 output ({why}); --force only replaces earlier outputs and "
        "nothing was deleted. Remove it yourself or choose another path.",
        path=out,
    )


def is_unfinished(folder: Path) -> bool:
    """A staging folder (a run in progress or killed) or an output set aside while publishing: it
    may hold a manifest, but it is not an output to publish anywhere."""
    return _STAGING_MARK in folder.name or _REPLACED_MARK in folder.name or (folder / _OWNER_FILE).exists()


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out``; removed again unless the caller publishes it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}{_STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    (staging / _OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path, existing: Existing | None) -> None:
    """Move the finished staging folder to ``out``.

    ``existing`` is what ``check_output`` found there. Whatever is at ``out`` now is moved aside
    first, checked to be that same folder and still replaceable, and only then deleted; a folder
    that appeared at ``out`` meanwhile is never replaced (the run fails and leaves it alone).
    """
    (staging / _OWNER_FILE).unlink(missing_ok=True)
    _swap_in(staging, out, existing, still_ours=lambda aside: _still_replaceable(aside, existing),
             discard=lambda aside: shutil.rmtree(aside, ignore_errors=True))


def _swap_in(
    new: Path, out: Path, existing: Existing | None, *, still_ours: Callable[[Path], bool],
    discard: Callable[[Path], None],
) -> None:
    """Rename ``new`` to ``out``; what is at ``out`` is moved aside and discarded only if ``still_ours``."""
    if existing is None:
        try:
            _rename_noreplace(new, out)
        except FileExistsError:
            raise OutputExistsError(
                f"{out}: appeared while converting (another run or program created it); it was left as it is "
                "and this run's output discarded. Convert again, or choose another path.",
                path=out,
            ) from None
        return
    aside = out.parent / f".{out.name}{_REPLACED_MARK}{uuid.uuid4().hex[:8]}"
    try:
        _rename_noreplace(out, aside)
    except FileNotFoundError:  # removed meanwhile: nothing to replace
        return _swap_in(new, out, None, still_ours=still_ours, discard=discard)
    if not still_ours(aside):
        _put_back(aside, out)
        raise _changed(out)
    try:
        _rename_noreplace(new, out)
    except FileExistsError:
        raise OutputExistsError(
            f"{out}: appeared while publishing; the earlier output is kept at {aside} and this run's output "
            "discarded. Convert again.",
            path=out,
        ) from None
    discard(aside)


def _still_replaceable(folder: Path, existing: Existing) -> bool:
    st = os.lstat(folder)
    if (st.st_dev, st.st_ino) != (existing.device, existing.inode):
        return False
    if _is_empty(folder):
        return True
    if existing.empty:
        return False
    try:
        _check_replaceable(folder)
    except OutputExistsError:
        return False
    return True


def _is_empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def _changed(out: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{out}: changed while converting (it is no longer the earlier output that was checked); it was left as "
        "it is and this run's output discarded. Convert again.",
        path=out,
    )


def _put_back(aside: Path, out: Path) -> None:
    try:
        _rename_noreplace(aside, out)
    except OSError as e:
        raise OutputExistsError(
            f"{out}: changed while converting, and something new appeared there too; what was there is kept at "
            f"{aside}, and this run's output was discarded.",
            path=out,
        ) from e


def check_output_file(out: Path, source_root: Path, *, force: bool) -> Existing | None:
    """``check_output`` for a single-file output: ``None`` if ``out`` is free, else the file ``force`` may replace."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: this target writes one .safetensors file; give an output path ending in .safetensors.")
    out_r, src_r = out.resolve(), source_root.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise OutputExistsError(f"{out}: is inside the source {source_root}; choose a path outside it.", path=out)
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise OutputExistsError(f"{out}: is a symbolic link; give the file it points to, or a new path.", path=out)
    if not stat.S_ISREG(st.st_mode):
        raise OutputExistsError(f"{out}: exists and is not a file; this target writes one file. Choose another path.",
                                path=out)
    if not force:
        raise OutputExistsError(f"{out}: already exists; pass --force (force=True) to replace it.", path=out)
    _check_file_replaceable(out)
    return Existing(st.st_dev, st.st_ino, empty=False)


def _check_file_replaceable(out: Path) -> None:
    try:
        header = read_header(out)
    except CorruptCheckpointError as e:
        raise _not_ours(out, "it is not a valid safetensors file") from e
    if read_file_record(header.metadata, set(header.tensors)) is None:
        raise _not_ours(out, "its header carries no omni-fp8 record listing exactly its tensors")


def publish_file(staged: Path, out: Path, existing: Existing | None) -> None:
    """``publish`` for one file: ``out`` is replaced only if it is still the file checked at start."""

    def still_ours(aside: Path) -> bool:
        st = os.lstat(aside)
        if (st.st_dev, st.st_ino) != (existing.device, existing.inode) or not stat.S_ISREG(st.st_mode):
            return False
        try:
            _check_file_replaceable(aside)
        except OutputExistsError:
            return False
        return True

    _swap_in(staged, out, existing, still_ours=still_ours, discard=lambda aside: aside.unlink(missing_ok=True))


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return getattr(libc, "renameat2", None)
    except OSError:
        return None


_RENAMEAT2 = _renameat2()


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with ``FileExistsError`` instead of replacing ``dst``.

    On Linux this is one atomic ``renameat2(RENAME_NOREPLACE)``. Elsewhere (or on filesystems
    without it) the check and the rename are two steps; a plain rename never replaces a folder
    that has anything in it, so the window can at worst swallow an empty folder.
    """
    if _RENAMEAT2 is not None:
        result = _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if result == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from e
        raise


def _remove_stale_staging(out: Path) -> None:
    """Delete staging folders of earlier runs for ``out`` that were killed on this host."""
    host = socket.gethostname()
    for candidate in out.parent.glob(f".{out.name}{_STAGING_MARK}*"):
        try:
            owner = json.loads((candidate / _OWNER_FILE).read_text())
            pid = int(owner["pid"])
        except (OSError, ValueError, TypeError, KeyError, RecursionError):
            continue
        if isinstance(owner, dict) and owner.get("host") == host and not _pid_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
