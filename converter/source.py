"""Where a checkpoint comes from: a diffusers pipeline folder or a transformer folder.

``open_source`` resolves what the user named into a ``Source``: the folder holding the transformer
(``config.json`` + safetensors shards [+ index]), its config, and every shard header, all validated
before anything is converted (a bad shard found at 90% would waste the first 90%). Nothing here
reads tensor data; ``Source.open_reader`` hands out tensors one at a time.

A model in the Hugging Face cache resolves to its snapshot folder here (its files are links into
the cache's blobs), and a Hub repo id (``Qwen/Qwen-Image``) to the snapshot its files are downloaded
into (``hub.py``), so everything after this module only ever sees a local folder. A Hub source's
shards may still be on their way: the reader waits for each one (``FileSet.fetch``), so a
conversion starts on the first shard while the next ones download.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

import torch

from . import hub, readahead
from .errors import (
    ConfigError,
    CorruptCheckpointError,
    OmniFp8Error,
    PickleCheckpointError,
    SourceNotFoundError,
    UnsupportedSourceError,
)
from .filenames import (
    CONFIG_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    MODEL_INDEX_NAME,
    PICKLE_SUFFIXES,
    TRANSFORMER_COMPONENT,
    WEIGHTS_NAME,
)
from .options import parse_path
from .safetensors_format import SafetensorsHeader, TensorInfo, read_header, read_tensor

__all__ = [
    "Source",
    "FileSet",
    "open_source",
    "check_not_quantized",
    "read_json",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "CONFIG_NAME",
    "MODEL_INDEX_NAME",
]

_LAYOUT_HINT = (
    "give a diffusers pipeline folder (with model_index.json) or a transformer folder "
    "(config.json + *.safetensors)"
)


class FileSet(Protocol):
    """Where a source's files are: a local folder (``LocalFiles``) or a Hub repo (``hub.RepoFiles``).

    Everything ``open_source`` needs to know about a folder goes through here, so a Hub repo is
    planned from its listing and remote headers before any shard is downloaded.
    """

    def exists(self, path: Path) -> bool: ...

    def is_dir(self, path: Path) -> bool: ...

    def children(self, folder: Path) -> list[str]: ...

    def files(self, folder: Path) -> list[str]: ...

    def header(self, path: Path) -> SafetensorsHeader: ...

    def fetch(self, path: Path) -> Path: ...

    def downloading(self, paths: Sequence[Path], *, progress: bool) -> AbstractContextManager[None]: ...


class LocalFiles:
    """A folder on this machine: everything is already here."""

    def exists(self, path: Path) -> bool:
        return path.is_file()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def children(self, folder: Path) -> list[str]:
        return sorted(os.listdir(folder))

    def files(self, folder: Path) -> list[str]:
        """Every file below ``folder`` (relative to it), hidden ones left out.

        Symbolic links are followed (a Hugging Face cache snapshot is made of them, and a
        component may be a link to a folder elsewhere); a broken link, a link loop, or anything
        that is not a plain file or folder (a FIFO would block the copy forever) is refused, naming it.
        """
        out: list[str] = []
        _walk(folder, (), set(), out)
        return out

    def header(self, path: Path) -> SafetensorsHeader:
        return read_header(path)

    def fetch(self, path: Path) -> Path:
        return path

    def downloading(self, paths: Sequence[Path], *, progress: bool) -> AbstractContextManager[None]:
        return nullcontext()


def _walk(folder: Path, rel: tuple[str, ...], ancestors: set[tuple[int, int]], out: list[str]) -> None:
    st = os.stat(folder)
    key = (st.st_dev, st.st_ino)
    if key in ancestors:
        raise UnsupportedSourceError(
            f"{folder}: a symbolic link loop (the folder contains itself); remove the link.", path=folder
        )
    ancestors = ancestors | {key}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = folder / name
        try:
            st = os.stat(path)  # follows symbolic links
        except FileNotFoundError as e:
            raise SourceNotFoundError(
                f"{path}: a broken symbolic link (to {os.readlink(path)}); restore its target or remove it.",
                path=path,
            ) from e
        except OSError as e:
            raise UnsupportedSourceError(f"{path}: cannot be read ({e.strerror}); fix or remove it.", path=path) from e
        if stat.S_ISDIR(st.st_mode):
            _walk(path, (*rel, name), ancestors, out)
        elif stat.S_ISREG(st.st_mode):
            out.append("/".join((*rel, name)))
        else:
            raise UnsupportedSourceError(
                f"{path}: not a regular file ({_file_kind(st.st_mode)}); a checkpoint folder holds only files "
                "and folders. Remove it, or copy the checkpoint without it.",
                path=path,
            )


@dataclass(frozen=True)
class Source:
    """A validated checkpoint: the transformer to convert and, for a pipeline, everything around it.

    Attributes:
        root: The folder the user named (for a Hub repo: its snapshot folder in the Hub cache).
        kind: ``"pipeline"`` (root has model_index.json) or ``"transformer"``.
        model_dir: The folder holding the transformer's config and shards.
        config: The transformer's config.json.
        shards: Every shard's validated header, in load order.
        origin: Provenance for the manifest (path; repo id, revision, commit for Hub sources).
        files: Where the files are; a Hub source downloads them as they are needed.
    """

    root: Path
    kind: str
    model_dir: Path
    config: dict[str, Any]
    shards: tuple[SafetensorsHeader, ...]
    origin: dict[str, Any] = field(default_factory=dict)
    files: FileSet = field(default_factory=LocalFiles, repr=False, compare=False)

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]

    @property
    def subfolder(self) -> str:
        """The transformer folder relative to ``root`` (``""`` for a transformer folder)."""
        rel = self.model_dir.relative_to(self.root).as_posix()
        return "" if rel == "." else rel

    @property
    def tensors(self) -> list[TensorInfo]:
        """Every tensor in file order, the order that reads the disk front to back."""
        return [t for shard in self.shards for t in shard.tensors.values()]

    @property
    def data_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    def component_only(self) -> Source:
        """The transformer folder alone, as if it had been named (``convert --subfolder``): nothing
        else of the pipeline is carried over, or downloaded."""
        return replace(self, root=self.model_dir, kind="transformer",
                       origin={**self.origin, "subfolder": self.subfolder} if self.subfolder else self.origin)

    def passthrough_files(self) -> list[str]:
        """Files a converted folder carries over unchanged, relative to ``root``.

        For a pipeline: every other component and top-level file. Inside the transformer folder:
        whatever is not a weight file, an index or config.json (a README, say). Hidden files and
        manifests of earlier conversions are never carried (see ``LocalFiles.files`` for links).
        """
        component = self.subfolder
        out = []
        for rel in self.files.files(self.root):
            folder, _, name = rel.rpartition("/")
            if name == MANIFEST_NAME or (folder == component and _is_weight_or_config(name)):
                continue
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            out.append(rel)
        return out

    def local_file(self, rel: str) -> Path:
        """The file ``rel`` (relative to ``root``) on this disk; a Hub source downloads it if needed."""
        return self.files.fetch(self.root / rel)

    def downloading(self, rels: Sequence[str] = (), *, progress: bool = True) -> AbstractContextManager[None]:
        """While the body runs, fetch in the background what a job will read: the shards, in reading
        order, then ``rels``. Nothing to do for a local folder."""
        paths = [shard.path for shard in self.shards] + [self.root / rel for rel in rels]
        return self.files.downloading(paths, progress=progress)

    @contextmanager
    def open_reader(self, order: Sequence[TensorInfo] | None = None) -> Iterator[_Reader]:
        """Yield a reader that returns one tensor at a time, keeping shard files open.

        ``order`` is the order the job will read tensors in, a tensor read twice listed twice
        (default: file order). A thread reads them ahead of the job, a bounded number of bytes at
        a time (``readahead.py``), so a checkpoint that is not in the page cache streams off the
        disk while the job computes. A tensor is a view of the file's mapping or of the buffer
        the thread read it into; either lives as long as the tensor. Treat it as read-only.
        """
        budget = readahead.DEFAULT_BUDGET
        ahead = None
        if budget > 0:
            ahead = readahead.Readahead(self.tensors if order is None else order, budget=budget, locate=_ready)
        reader = _Reader(self.files, ahead)
        try:
            yield reader
        finally:
            reader.close()


class _Reader:
    def __init__(self, files: FileSet, ahead: readahead.Readahead | None = None) -> None:
        self._files: dict[Path, BinaryIO] = {}
        self._fetch = files.fetch
        self._ahead = ahead

    def read(self, info: TensorInfo) -> torch.Tensor:
        if self._ahead is not None:
            self._ahead.reached(info)
            data = self._ahead.take(info)  # read past the page cache, when the file was on disk
            if data is not None:
                return data.view(info.torch_dtype).reshape(info.shape)
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(self._fetch(info.file), "rb")
        return read_tensor(f, info)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()  # first: the thread may be reading these files
        for f in self._files.values():
            f.close()
        self._files.clear()


def _ready(path: Path) -> Path | None:
    """A shard the read-ahead may open now: a Hub shard still downloading is not (its link appears when
    it is complete), and is in the page cache once it is."""
    return path if path.is_file() else None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Load a JSON object, or fail with one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError as e:
        raise SourceNotFoundError(f"{path}: {what} not found.", path=path) from e
    except RecursionError as e:
        raise CorruptCheckpointError(
            f"{path}: {what} nests JSON too deeply to be read; fix or re-download it.", path=path
        ) from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptCheckpointError(
            f"{path}: {what} is not valid JSON ({e}); fix or re-download it.", path=path
        ) from e
    except IsADirectoryError as e:
        raise CorruptCheckpointError(f"{path}: {what} is a folder, not a file.", path=path) from e
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{path}: {what} must be a JSON object.", path=path)
    return value


def open_source(
    src: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    allow_quantized: bool = False,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
) -> Source:
    """Resolve and validate a checkpoint folder, or a Hugging Face Hub repo.

    Args:
        src: A diffusers pipeline folder (its ``transformer/`` is converted), a transformer
            folder, a model's folder in the Hugging Face cache (``models--org--name``, read at
            the snapshot ``refs/main`` points to) or one of its ``snapshots/<commit>`` folders,
            or a Hub repo id (``Qwen/Qwen-Image``). A folder that exists wins over a repo id
            spelled the same.
        subfolder: The transformer's folder inside ``src`` instead of ``transformer/``.
        revision: For a repo id: the branch, tag or commit (default ``main``).
        token: For a repo id: a Hub token (default: ``HF_TOKEN`` or the one ``hf auth login`` saved).
        allow_quantized: Accept an FP8 checkpoint (the loader reads them; the converter refuses
            to quantize twice).
        config: For a single ``.safetensors`` file (ComfyUI's and BFL's form), which carries no
            config: the model's ``config.json``, its folder, or the dict.

    A repo is read through the Hub cache (``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``
    honoured as diffusers honours them): opening it fetches its configs and reads each shard's
    header remotely; shards are downloaded only when read (``Source.downloading``).

    Example:
        >>> source = open_source("./Qwen-Image")  # doctest: +SKIP
        >>> source.class_name, source.data_bytes  # doctest: +SKIP
        ('QwenImageTransformer2DModel', 40861043456)
    """
    root = parse_path(src, what="the source")
    if subfolder is not None and not isinstance(subfolder, str):
        raise ConfigError(f"subfolder must be a str such as 'transformer', got {type(subfolder).__name__} {subfolder!r}.")
    for name, value in (("revision", revision), ("token", token)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{name} must be a non-empty str, got {type(value).__name__} {value!r}.")
    if not root.exists():
        if hub.is_repo_id(str(src)):
            return _open_repo(str(src), subfolder=subfolder, revision=revision, token=token,
                              allow_quantized=allow_quantized)
        raise SourceNotFoundError(f"{root}: no such folder; {_LAYOUT_HINT}, or a Hub repo id (org/name).", path=root)
    if revision is not None:
        raise ConfigError(f"{root}: a local folder has no revisions; --revision (revision=) applies to Hub repo ids.")
    if root.is_file() and root.suffix == ".safetensors":
        return _single_file(root.resolve(), config, allow_quantized)
    if not root.is_dir():
        if root.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(root)
        raise UnsupportedSourceError(f"{root}: not a folder; {_LAYOUT_HINT}.", path=root)
    root = root.resolve()
    origin: dict[str, Any] = {"type": "local", "path": str(root)}
    cache = _hf_cache_snapshot(root)
    if cache is not None:
        root, origin = cache
    return _open(root, origin, LocalFiles(), subfolder=subfolder, allow_quantized=allow_quantized)


def _open_repo(repo_id: str, *, subfolder: str | None, revision: str | None, token: str | None,
               allow_quantized: bool) -> Source:
    """A Hub repo: planned from its configs and remote headers; messages name the repo, not the cache."""
    files = hub.open_repo(repo_id, revision=revision, token=token)
    try:
        return _open(files.root, files.origin(), files, subfolder=subfolder, allow_quantized=allow_quantized)
    except OmniFp8Error as e:
        message = str(e).replace(f"{files.root}/", f"{files.label}: ").replace(str(files.root), files.label)
        raise type(e)(message, path=e.path) from e


def _open(root: Path, origin: dict[str, Any], files: FileSet, *, subfolder: str | None,
          allow_quantized: bool) -> Source:
    if subfolder:
        model_dir = root / _plain_subfolder(subfolder, root)
        kind = "pipeline" if files.exists(root / MODEL_INDEX_NAME) else "transformer"
    elif files.exists(root / MODEL_INDEX_NAME):
        kind, model_dir = "pipeline", _pipeline_transformer_dir(root)
    else:
        kind, model_dir = "transformer", root
    if not files.is_dir(model_dir):
        raise SourceNotFoundError(f"{model_dir}: no such folder; {_LAYOUT_HINT}.", path=model_dir)

    config = _read_config(model_dir, files)
    shards = _find_shards(model_dir, files)
    source = Source(root=root, kind=kind, model_dir=model_dir, config=config, shards=shards, origin=origin, files=files)
    if not allow_quantized:
        check_not_quantized(source)
    return source


def _single_file(path: Path, config: Any, allow_quantized: bool) -> Source:
    """One ``.safetensors`` file, its model config given separately (it carries none)."""
    if config is None:
        raise SourceNotFoundError(
            f"{path}: a single safetensors file carries no model config; pass config= (the model's config.json, "
            "its folder, or a dict), e.g. the transformer folder of the BF16 release.",
            path=path,
        )
    if isinstance(config, dict):
        model_config = dict(config)
        if not isinstance(model_config.get("_class_name"), str):
            raise ConfigError("config= must name the model class in '_class_name', as a diffusers config.json does.")
    else:
        where = parse_path(config, what="config")
        if where.is_dir():
            model_config = _read_config(where, LocalFiles())
        else:
            model_config = read_json(where, "config")
            if not isinstance(model_config.get("_class_name"), str):
                raise CorruptCheckpointError(f"{where}: has no '_class_name'; give a diffusers model config.json.",
                                             path=where)
    model_config.pop("quantization_config", None)  # the file's layout says how it is quantized
    source = Source(root=path.parent, kind="file", model_dir=path.parent, config=model_config,
                    shards=(read_header(path),), origin={"type": "file", "path": str(path)})
    if not allow_quantized:
        check_not_quantized(source)
    return source


def _plain_subfolder(subfolder: str, root: Path) -> str:
    """A subfolder is a relative path inside ``root``, judged by its text (it may be a link)."""
    parts = PurePosixPath(subfolder.replace("\\", "/")).parts
    if not parts or PurePosixPath(subfolder).is_absolute() or any(p in ("..", "") for p in parts) or "\0" in subfolder:
        raise UnsupportedSourceError(
            f"{subfolder!r} is not a folder inside {root}; give a relative path such as 'transformer'.", path=root
        )
    return "/".join(p for p in parts if p != ".")


def _hf_cache_snapshot(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """A model's folder in the Hugging Face cache, or one of its snapshots: the snapshot to read.

    ``hf download`` without ``--local-dir`` (and diffusers' own downloads) leave
    ``models--org--name/{blobs,refs,snapshots/<commit>}``; the snapshot's files are relative
    links into ``blobs/``. The repo folder is read at the commit ``refs/main`` names.
    """
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        repo_dir, snapshot = root.parent.parent, root
    elif root.name.startswith("models--") and (root / "snapshots").is_dir():
        repo_dir = root
        ref = repo_dir / "refs" / "main"
        snapshots = sorted(p.name for p in (repo_dir / "snapshots").iterdir() if p.is_dir())
        if ref.is_file():
            snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        elif len(snapshots) == 1:
            snapshot = repo_dir / "snapshots" / snapshots[0]
        else:
            raise SourceNotFoundError(
                f"{root}: a Hugging Face cache folder without refs/main and with "
                f"{len(snapshots)} snapshots; pass one of them: "
                + (", ".join(str(repo_dir / "snapshots" / n) for n in snapshots[:3]) or "(none downloaded)"),
                path=root,
            )
        if not snapshot.is_dir():
            raise SourceNotFoundError(
                f"{snapshot}: refs/main names a snapshot that is not in the cache; download the model again.",
                path=snapshot,
            )
    else:
        return None
    repo_id = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
    return snapshot, {"type": "hf-cache", "path": str(snapshot), "repo_id": repo_id, "commit": snapshot.name}


def _pipeline_transformer_dir(root: Path) -> Path:
    index = read_json(root / MODEL_INDEX_NAME, "model_index.json")
    if TRANSFORMER_COMPONENT not in index:
        components = sorted(k for k in index if not k.startswith("_"))
        raise UnsupportedSourceError(
            f"{root / MODEL_INDEX_NAME}: the pipeline has no 'transformer' component "
            f"(it has {', '.join(components) or 'none'}); pass the component's folder instead.",
            path=root / MODEL_INDEX_NAME,
        )
    return root / TRANSFORMER_COMPONENT


def _read_config(model_dir: Path, files: FileSet) -> dict[str, Any]:
    path = model_dir / CONFIG_NAME
    if not files.exists(path):
        if _pickles(model_dir, files):
            raise _pickle_error(model_dir, files)
        raise SourceNotFoundError(f"{path}: config.json not found; {_LAYOUT_HINT}.", path=path)
    config = read_json(path, "config.json")
    if not isinstance(config.get("_class_name"), str) or not config["_class_name"]:
        raise CorruptCheckpointError(
            f"{path}: config.json has no '_class_name', so the model class is unknown; "
            "it should name a diffusers class such as QwenImageTransformer2DModel.",
            path=path,
        )
    return config


def _find_shards(model_dir: Path, files: FileSet) -> tuple[SafetensorsHeader, ...]:
    index_path = model_dir / INDEX_NAME
    if files.exists(index_path):
        return _shards_from_index(model_dir, index_path, files)
    single = model_dir / WEIGHTS_NAME
    if files.exists(single):
        return (files.header(single),)
    found = [n for n in files.children(model_dir) if n.endswith(".safetensors") and files.exists(model_dir / n)]
    if len(found) == 1:
        return (files.header(model_dir / found[0]),)
    if found:
        raise CorruptCheckpointError(
            f"{model_dir}: {len(found)} safetensors files ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}) but no {INDEX_NAME} saying which belong to the model; "
            "restore the index or keep one variant.",
            path=model_dir,
        )
    if _pickles(model_dir, files):
        raise _pickle_error(model_dir, files)
    raise SourceNotFoundError(
        f"{model_dir}: no *.safetensors weights found; {_LAYOUT_HINT}.", path=model_dir
    )


def _shards_from_index(model_dir: Path, index_path: Path, files: FileSet) -> tuple[SafetensorsHeader, ...]:
    index = read_json(index_path, "the shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(
            f"{index_path}: the index has no 'weight_map'; restore it from the original checkpoint.",
            path=index_path,
        )
    names_of: dict[str, list[str]] = {}
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or not _is_plain_filename(filename):
            raise CorruptCheckpointError(
                f"{index_path}: tensor {name!r} points to {filename!r}, outside the model folder; "
                "an index may only name files beside it.",
                path=index_path,
            )
        names_of.setdefault(filename, []).append(name)
    shards = []
    for filename, names in names_of.items():
        path = model_dir / filename
        if not files.exists(path):
            raise SourceNotFoundError(
                f"{path}: shard named by {index_path.name} is missing ({len(names)} tensors, e.g. "
                f"{names[0]!r}); re-download the checkpoint.",
                path=path,
            )
        header = files.header(path)
        mapped, present = set(names), set(header.tensors)
        if mapped != present:
            missing = sorted(mapped - present)
            extra = sorted(present - mapped)
            detail = (
                f"the index maps {missing[0]!r} ({len(missing)} in all) to it but the file lacks it"
                if missing
                else f"it holds {extra[0]!r} ({len(extra)} in all) that the index does not map"
            )
            raise CorruptCheckpointError(
                f"{path}: does not match {index_path.name}: {detail}; re-download the checkpoint.",
                path=path,
            )
        shards.append(header)
    return tuple(shards)


def check_not_quantized(source: Source) -> None:
    """Refuse to quantize twice: a ``quantization_config`` or FP8 tensors mean an FP8 checkpoint."""
    quantized = "quantization_config" in source.config or any(t.dtype.startswith("F8_") for t in source.tensors)
    if quantized:
        model_dir = source.model_dir
        raise UnsupportedSourceError(
            f"{model_dir}: this checkpoint is already quantized (quantization_config or FP8 tensors); "
            "convert the original BF16/FP16/FP32 checkpoint instead, or load this one as it is.",
            path=model_dir,
        )


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


def _is_plain_filename(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _is_weight_or_config(name: str) -> bool:
    return (
        name == CONFIG_NAME
        or name.endswith(".safetensors")
        or name.endswith(".safetensors.index.json")
        or name.endswith(PICKLE_SUFFIXES)
        or name.endswith(".bin.index.json")
    )


def _pickles(folder: Path, files: FileSet) -> list[Path]:
    return [folder / n for n in files.children(folder) if n.endswith(PICKLE_SUFFIXES)]


def _pickle_error(where: Path, files: FileSet | None = None) -> PickleCheckpointError:
    found = [where] if files is None else _pickles(where, files)
    names = ", ".join(p.name for p in found[:3]) + (f" ({len(found) - 3} more)" if len(found) > 3 else "")
    return PickleCheckpointError(
        f"{where}: only pickle checkpoints found ({names}); omni-fp8 never unpickles (it can run "
        "arbitrary code). Convert them to safetensors on a machine you trust, e.g. "
        "model.save_pretrained(dir, safe_serialization=True).",
        path=where,
    )
