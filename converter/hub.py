"""A Hugging Face Hub repo as a source, read through ``huggingface_hub`` and its cache.

A repo id (``Qwen/Qwen-Image``) is resolved at a revision to one commit, and its files land where
``hf download`` and diffusers put them (``$HF_HUB_CACHE/models--org--name/snapshots/<commit>/``):
the three share one copy, a second run downloads nothing, and ``HF_HUB_OFFLINE=1`` works from the
cache alone. ``huggingface_hub`` makes every request; this module decides what to ask for, and when:

* ``open_repo`` fetches the repo's small files (configs, shard indexes, manifests) and its file
  listing. Shard headers are read remotely, a range request each, until a shard is in the cache,
  so a plan (``omni-convert inspect``) costs kilobytes whatever the checkpoint weighs.
* ``RepoFiles.downloading`` fetches what a job reads, in the order it reads it, in a background
  thread: the converter works on shard 1 while shard 2 arrives. A downloaded shard must have
  exactly the header its plan was made from.
* Every ``huggingface_hub`` failure becomes one ``OmniFp8Error`` line naming the repo and the fix
  (``hub_error``), for ``push`` as well.

``RepoFiles`` answers the questions ``source.py`` asks of a folder (does this file exist, what is in
that folder, what is this shard's header), so everything after ``open_source`` sees a local folder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from .errors import (
    CorruptCheckpointError,
    HubAccessError,
    HubConnectionError,
    OmniFp8Error,
    SourceNotFoundError,
)
from .filenames import CONFIG_NAME, MANIFEST_NAME, MODEL_INDEX_NAME, PICKLE_SUFFIXES
from .safetensors_format import SafetensorsHeader, parse_header, read_header

__all__ = ["is_repo_id", "open_repo", "RepoFiles", "hub_error", "hub_errors", "offline"]

# What a plan reads, whatever the layout: every config, shard index and manifest. A few kB each,
# the other components' configs included (a pipeline's are needed to carry it over anyway).
_METADATA_PATTERNS = [
    MODEL_INDEX_NAME, CONFIG_NAME, f"*/{CONFIG_NAME}", "*.safetensors.index.json", MANIFEST_NAME, f"*/{MANIFEST_NAME}",
]
# Weights in a format other than safetensors, skipped in a folder that also has safetensors: a
# diffusers pipeline loads the safetensors, and the others would only double the download.
_OTHER_FORMATS = (*PICKLE_SUFFIXES, ".msgpack", ".h5", ".onnx", ".onnx_data")


def is_repo_id(text: str) -> bool:
    """``org/name`` as the Hub spells repo ids (one slash, no path syntax): what may be looked up there."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith(("/", ".", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    """``HF_HUB_OFFLINE=1`` as huggingface_hub read it at import, exactly as diffusers honours it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


class _Silent(tqdm):
    """huggingface_hub's own bars, switched off: ours show the job's bytes, not each request's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        super().__init__(*args, **{**kwargs, "disable": True})


def open_repo(repo_id: str, *, revision: str | None = None, token: str | None = None) -> RepoFiles:
    """Resolve ``repo_id`` at ``revision`` (default: ``main``) to a commit and fetch its small files.

    Raises a one-line ``OmniFp8Error`` for a missing repo or revision, a gated or private repo
    without a usable token, and a cache that cannot stand in for the network (offline, or the
    Hub unreachable) with what is missing named.
    """
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision, token, doing="reading its configs"):
        snapshot = Path(snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=_METADATA_PATTERNS, tqdm_class=_Silent
        ))
    return RepoFiles(repo_id, revision=revision, commit=snapshot.name, snapshot=snapshot,
                     listing=_listing(repo_id, snapshot), token=token)


def _listing(repo_id: str, snapshot: Path) -> dict[str, int]:
    """Every file of the repo at the snapshot's commit, with its size.

    ``snapshot_download`` keeps the tree listing in the cache, so it is known offline too; a cache
    filled by other means has none, and then the files there are all there is.
    """
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {f.path: f.size for f in get_cached_repo_tree(repo_id, revision=snapshot.name)}
    except CachedRepoTreeNotFoundError:
        return {p.relative_to(snapshot).as_posix(): p.stat().st_size for p in snapshot.rglob("*") if p.is_file()}


class RepoFiles:
    """One repo at one commit: its file listing, and its files in the Hub cache once needed.

    Paths are the ones the files have (or will have) in the cache snapshot, so a ``Source`` built
    on them reads like any local folder; nothing is downloaded until ``fetch`` or ``downloading``.
    """

    def __init__(self, repo_id: str, *, revision: str | None, commit: str, snapshot: Path,
                 listing: dict[str, int], token: str | None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.commit = commit
        self.root = snapshot
        self.listing = listing
        self._token = token
        self._planned: dict[str, SafetensorsHeader] = {}  # headers read remotely, checked after download
        self._checked: set[str] = set()
        self._lock = threading.Lock()
        self._queued: dict[str, _Pending] = {}

    @property
    def label(self) -> str:
        """``org/name@revision``: how messages name the repo."""
        return f"{self.repo_id}@{self.revision or 'main'}"

    def origin(self) -> dict[str, Any]:
        """Provenance for the manifest: the repo, the revision asked for, the commit it resolved to."""
        return {"type": "hub", "repo_id": self.repo_id, "revision": self.revision or "main",
                "commit": self.commit, "path": str(self.root)}

    # --- what source.py asks of a folder ----------------------------------------------------------

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def exists(self, path: Path) -> bool:
        return self.rel(path) in self.listing

    def is_dir(self, path: Path) -> bool:
        rel = self.rel(path)
        return rel == "." or any(name.startswith(rel + "/") for name in self.listing)

    def children(self, folder: Path) -> list[str]:
        """Names directly inside ``folder`` (files and folders), as ``os.listdir`` gives them."""
        rel = self.rel(folder)
        prefix = "" if rel == "." else rel + "/"
        return sorted({name[len(prefix):].split("/", 1)[0] for name in self.listing if name.startswith(prefix)})

    def files(self, folder: Path) -> list[str]:
        """Every file below ``folder``, relative to it; other weight formats beside safetensors are left out."""
        rel = self.rel(folder)
        prefix = "" if rel == "." else rel + "/"
        with_safetensors = {str(PurePosixPath(n).parent) for n in self.listing if n.endswith(".safetensors")}
        return sorted(
            name[len(prefix):] for name in self.listing
            if name.startswith(prefix)
            and not (name.endswith(_OTHER_FORMATS) and str(PurePosixPath(name).parent) in with_safetensors)
        )

    def header(self, path: Path) -> SafetensorsHeader:
        """A shard's header: from the cache if the shard is there, else read remotely (no download)."""
        rel = self.rel(path)
        if path.is_file():
            return read_header(path)
        if offline():
            raise self._not_cached(rel)
        from huggingface_hub import HfApi

        with hub_errors(self.repo_id, self.revision, self._token, doing=f"reading the header of {rel}", file=rel):
            remote = HfApi(token=self._token).parse_safetensors_file_metadata(self.repo_id, rel, revision=self.commit)
        table: dict[str, Any] = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
            for name, t in remote.tensors.items()
        }
        table["__metadata__"] = remote.metadata or {}
        size = self.listing[rel]
        data = max((t.data_offsets[1] for t in remote.tensors.values()), default=0)
        if size - data < 8:
            raise CorruptCheckpointError(
                f"{self.label}: {rel} is {size} bytes but its header describes {data} bytes of tensors; the file on "
                "the Hub is damaged.", path=path)
        header = parse_header(path, table, data_start=size - data, file_size=size)
        self._planned[rel] = header
        return header

    def fetch(self, path: Path) -> Path:
        """The file at ``path``, in the cache: waited for if it is being downloaded, else downloaded now."""
        rel = self.rel(path)
        with self._lock:
            pending = self._queued.get(rel)
        if pending is not None:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
        elif not path.is_file():
            if offline():
                raise self._not_cached(rel)
            self._download(rel, _Silent)
        self._check_planned(rel, path)
        return path

    @contextmanager
    def downloading(self, paths: Sequence[Path], *, progress: bool) -> Iterator[None]:
        """Download the missing ones of ``paths`` in this order, in the background, while the body runs.

        One file at a time, in the order the job reads them, so the first shard is ready as soon
        as possible. On exit nothing new is started; a file being downloaded is finished by its
        thread (huggingface_hub writes it under a temporary name, so nothing partial is cached).
        """
        missing = list(dict.fromkeys(self.rel(p) for p in paths if not p.is_file()))
        if missing and offline():
            raise self._not_cached(missing[0])
        missing = [rel for rel in missing if rel not in self._queued]
        if not missing:
            yield
            return
        pending = {rel: _Pending() for rel in missing}
        with self._lock:
            self._queued.update(pending)
        stop = threading.Event()
        bar = tqdm(total=sum(self.listing.get(rel, 0) for rel in missing), unit="B", unit_scale=True,
                   desc=f"Downloading {self.repo_id}", disable=not progress)
        feed = _feeding(bar)

        def run() -> None:
            failure: OmniFp8Error | None = None
            for rel in missing:
                if failure is None and not stop.is_set():
                    try:
                        self._download(rel, feed)
                    except OmniFp8Error as e:
                        failure = e
                    except Exception as e:  # noqa: BLE001 - handed to the waiting thread, which reports it
                        failure = HubConnectionError(f"{self.label}: downloading {rel} failed ({type(e).__name__}: "
                                                     f"{_first_line(e)}); run the same command again.")
                if failure is not None or stop.is_set():
                    pending[rel].error = failure or HubConnectionError(f"{self.label}: {rel} was not downloaded.")
                pending[rel].done.set()
            bar.close()

        thread = threading.Thread(target=run, name="omni-fp8-download", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            with self._lock:
                for rel, item in pending.items():
                    if self._queued.get(rel) is item and not item.done.is_set():
                        del self._queued[rel]  # a later fetch downloads it in the foreground

    # --- internals ---------------------------------------------------------------------------------

    def _download(self, rel: str, tqdm_class: type) -> None:
        from huggingface_hub import hf_hub_download

        with hub_errors(self.repo_id, self.revision, self._token, doing=f"downloading {rel}", file=rel):
            hf_hub_download(self.repo_id, rel, revision=self.commit, token=self._token, tqdm_class=tqdm_class)

    def _check_planned(self, rel: str, path: Path) -> None:
        """A shard planned from its remote header must hold exactly that header."""
        planned = self._planned.get(rel)
        if planned is None or rel in self._checked:
            return
        local = read_header(path)
        if _layout(local) != _layout(planned):
            raise CorruptCheckpointError(
                f"{path}: the downloaded {rel} of {self.label} does not match the header read from the Hub before; "
                "the cached copy is damaged. Delete it and run again.", path=path)
        self._checked.add(rel)

    def _not_cached(self, rel: str) -> HubConnectionError:
        return _offline_error(self.repo_id, f"{rel} (commit {self.commit[:12]})")


class _Pending:
    """A file queued for the background download: set ``done`` once it is there, or ``error``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: OmniFp8Error | None = None


def _layout(header: SafetensorsHeader) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    return {n: (t.dtype, t.shape, t.begin, t.end) for n, t in header.tensors.items()}


def _feeding(bar: tqdm) -> type:
    """A ``tqdm_class`` for ``hf_hub_download`` that adds each file's bytes to the job's one bar."""

    class _Feed:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> _Feed:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            bar.update(n or 0)

        def close(self) -> None:
            pass

    return _Feed


@contextmanager
def hub_errors(repo_id: str, revision: str | None, token: str | None, *, doing: str, file: str | None = None,
               writing: bool = False) -> Iterator[None]:
    """Turn what huggingface_hub raises into one ``OmniFp8Error`` line (unknown errors pass through)."""
    try:
        yield
    except OmniFp8Error:
        raise
    except Exception as e:
        # An LFS upload failure arrives wrapped in a RuntimeError naming the file; the cause is what matters.
        cause = e.__cause__ if isinstance(e, RuntimeError) and isinstance(e.__cause__, Exception) else e
        mapped = hub_error(cause, repo=repo_id, revision=revision, token=token, file=file, doing=doing,
                           writing=writing)
        if mapped is None:
            raise
        raise mapped from e


def hub_error(e: BaseException, *, repo: str, revision: str | None = None, token: str | None = None,
              file: str | None = None, doing: str = "", writing: bool = False) -> OmniFp8Error | None:
    """The one-line error for a ``huggingface_hub`` failure, or ``None`` for one it does not know.

    The Hub answers "not found" for private repos too (it does not say whether a repo exists),
    so that message names both causes; a gated repo is told apart and gets its own fix.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    endpoint = constants.ENDPOINT
    where = f"{repo}@{revision}" if revision else repo
    login = "--token, HF_TOKEN or `hf auth login`"
    tokened = _has_token(token)
    if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError too: it must come first
        who = "the token given has not been granted access" if tokened else "no token was given"
        return HubAccessError(
            f"{repo}: a gated repo, and {who}; accept its conditions at {endpoint}/{repo} with your account and "
            f"pass a token of that account ({login}).")
    if isinstance(e, RepositoryNotFoundError):
        if writing:
            return HubAccessError(
                f"{repo}: cannot write there (the Hub answers 'not found' for a namespace you cannot write to); "
                f"check the repo id, and use a token with write access to {repo.split('/')[0]} ({login}).")
        who = "the token given cannot see it" if tokened else "no token was given"
        return SourceNotFoundError(
            f"{repo}: no such local folder, and no such repo on {endpoint} (or it is private and {who}); check "
            f"the name, or pass a token that can read it ({login}).")
    if isinstance(e, RevisionNotFoundError):
        return SourceNotFoundError(
            f"{repo}: no revision {revision!r} (a branch, tag or commit); pick one that exists "
            f"({endpoint}/{repo}/tree/main lists them), or leave --revision out for main.")
    if isinstance(e, RemoteEntryNotFoundError):
        return SourceNotFoundError(f"{where}: {file or 'a file'} is not in the repo; check --subfolder and the revision.")
    if isinstance(e, SafetensorsParsingError):
        return CorruptCheckpointError(f"{where}: {file}: not a valid safetensors file on the Hub ({_first_line(e)}).")
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        cause = e.__cause__ or e.__context__
        if offline() or isinstance(e, OfflineModeIsEnabled) or isinstance(cause, OfflineModeIsEnabled):
            return _offline_error(repo, file or "it")
        if isinstance(cause, (RepositoryNotFoundError, RevisionNotFoundError)):
            return hub_error(cause, repo=repo, revision=revision, token=token, file=file, doing=doing, writing=writing)
        return HubConnectionError(
            f"{repo}: cannot reach {endpoint} ({_first_line(cause or e)}) and {file or 'it'} is not in the Hugging Face "
            f"cache ({_cache_dir()}); check the network (and HF_ENDPOINT) and run again.")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403) and writing and not tokened:
            return HubAccessError(f"{repo}: pushing needs a token with write access, and none was given; pass one "
                                  f"({login}).")
        if status == 401:
            return HubAccessError(f"{repo}: the Hub refused the token (invalid or expired); pass a valid one ({login}).")
        if status == 403 and writing:
            return HubAccessError(
                f"{repo}: your token cannot write there ({_server_message(e)}); use a token with write access to "
                f"{repo.split('/')[0]} ({login}), or push to a namespace of your own.")
        if status == 403:
            return HubAccessError(f"{repo}: the Hub refused access ({_server_message(e)}); pass a token that can read "
                                  f"it ({login}).")
        return HubConnectionError(
            f"{repo}: the Hub answered {status} ({_server_message(e)}) while {doing or 'working'}; run the same "
            f"command again{_resume_hint(writing)}.")
    if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)) or (
        isinstance(e, OSError) and "Consistency check failed" in str(e)
    ):
        return HubConnectionError(
            f"{repo}: {doing or 'talking to the Hub'} failed ({_first_line(e)}); check the network and run the same "
            f"command again{_resume_hint(writing)}.")
    return None


def _resume_hint(writing: bool) -> str:
    if writing:
        return ": what was already uploaded is not sent again"
    return f": finished files are reused from the cache ({_cache_dir()})"


def _offline_error(repo: str, what: str) -> HubConnectionError:
    return HubConnectionError(
        f"{repo}: HF_HUB_OFFLINE is set and {what} is not in the Hugging Face cache ({_cache_dir()}); run once "
        "with network access to download it, or point HF_HUB_CACHE at a cache that has it.")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _has_token(token: str | None) -> bool:
    if token:
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - only decides the wording of a message
        return False


def _server_message(e: Any) -> str:
    response = getattr(e, "response", None)
    message = getattr(e, "server_message", None) or (response.headers.get("X-Error-Message") if response is not None
                                                     else None)
    if message:
        return _first_line(message)
    return f"{response.status_code} {response.reason_phrase}" if response is not None else _first_line(e)


def _first_line(e: object) -> str:
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__

