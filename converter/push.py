"""``omni-convert push``: a verified converted folder, with its model card, to a Hub repo.

A push publishes only what the manifest vouches for: the folder must pass ``verify`` first (a
changed byte, a missing or an extra file refuses the push), and the upload is exactly the files
the manifest lists, plus the manifest and the card. Hidden files (``.cache/`` of ``hf download``,
staging folders) are never sent; neither are local paths (the uploaded manifest drops the
source's path on this machine) nor tokens (they are only ever request headers).

Everything goes in one ``create_commit``, so the repo never shows a partial upload. It is
resumable: huggingface_hub uploads file contents before the commit and skips those the Hub
already has (Xet deduplication, or the LFS batch API without hf_xet), so running the same push
again after a failure sends only what is missing. ``upload_large_folder`` (gone in
huggingface_hub 2.x) is not needed: a converted folder is a few large files, not thousands.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import hub
from .errors import ConfigError, UnsupportedSourceError, VerificationError
from .filenames import CARD_NAME, MANIFEST_NAME
from .manifest import manifest_total_bytes, read_manifest, verify
from .model_card import settle_card
from .options import parse_path
from .output import is_unfinished
from .report import size_text

__all__ = ["push", "PushResult"]

@dataclass(frozen=True)
class PushResult:
    """What a push sent (or, with ``dry_run``, would send) and where."""

    folder: Path
    repo_id: str
    revision: str
    files: tuple[str, ...]
    bytes: int
    card: str  # "written" (ours) or "kept" (the user's)
    commit_url: str | None
    dry_run: bool

    def summary_line(self) -> str:
        what = f"{len(self.files)} files, {size_text(self.bytes)}"
        if self.dry_run:
            return f"dry run: would push {what} from {self.folder} to {self.repo_id}@{self.revision} (nothing uploaded)"
        return f"pushed {what} from {self.folder} to {self.repo_id}@{self.revision}: {self.commit_url}"

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "repo_id": self.repo_id, "revision": self.revision,
                "files": list(self.files), "bytes": self.bytes, "card": self.card,
                "commit_url": self.commit_url, "dry_run": self.dry_run}


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    overwrite_card: bool = False,
    progress: bool = True,
) -> PushResult:
    """Verify ``folder``, write its model card, and upload it to ``repo_id`` in one commit.

    Args:
        private: Create the repo private (an existing repo keeps its visibility).
        revision: The branch to push to (created from ``main`` if missing); default ``main``.
        commit_message: Default: ``"Upload FP8 weights (omni-fp8)"``.
        token: A token with write access (default: ``HF_TOKEN`` or the saved login).
        dry_run: Verify, write the card into the folder and list what would be uploaded; upload nothing.
        overwrite_card: Replace a ``README.md`` omni-fp8 did not write (the default keeps it).
        progress: Show progress bars (verification, upload).
    """
    folder = parse_path(folder, what="the folder").absolute()
    if not isinstance(repo_id, str) or not hub.is_repo_id(repo_id):
        raise ConfigError(f"{repo_id!r} is not a Hub repo id; give org/name, e.g. my-org/Qwen-Image-FP8.")
    for name, value in (("revision", revision), ("commit_message", commit_message), ("token", token)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{name} must be a non-empty str, got {type(value).__name__} {value!r}.")
    _refuse_partial(folder)
    manifest = read_manifest(folder)
    card_bytes = manifest["files"].get(CARD_NAME, {}).get("size", 0)
    with tqdm(total=manifest_total_bytes(manifest) - card_bytes, unit="B", unit_scale=True, desc="Verifying",
              disable=not progress) as bar:
        report = verify(folder, on_bytes=bar.update, ignore=(CARD_NAME,))
    if not report.ok:
        raise VerificationError(
            f"{folder}: {len(report.problems)} file(s) differ from its manifest ({report.problems[0]}); nothing was "
            "pushed. Run omni-convert verify to see them, then convert again or restore the files.", path=folder)
    card = settle_card(folder, manifest, repo_id, overwrite=overwrite_card)
    files = tuple(sorted([*manifest["files"], MANIFEST_NAME]))
    size = manifest_total_bytes(manifest)
    branch = revision or "main"
    if dry_run:
        return PushResult(folder, repo_id, branch, files, size, card, None, dry_run=True)
    url = _upload(folder, manifest, repo_id, files, private=private, revision=revision, token=token,
                  message=commit_message or "Upload FP8 weights (omni-fp8)", progress=progress)
    return PushResult(folder, repo_id, branch, files, size, card, url, dry_run=False)


def _refuse_partial(folder: Path) -> None:
    """A staging folder of a run in progress (or killed) may hold a manifest but is not an output."""
    if is_unfinished(folder):
        raise UnsupportedSourceError(
            f"{folder}: an unfinished omni-fp8 output (a staging folder); push the finished output folder instead.",
            path=folder)


def public_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest as uploaded: the source's path on this machine becomes its folder name."""
    public = json.loads(json.dumps(manifest))
    source = public["source"]
    path = source.pop("path", None)
    if path and not source.get("repo_id"):
        source["name"] = Path(path).name
    return (json.dumps(public, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _upload(folder: Path, manifest: dict[str, Any], repo_id: str, files: tuple[str, ...], *, private: bool,
            revision: str | None, token: str | None, message: str, progress: bool) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
        for rel in files if rel != MANIFEST_NAME
    ]
    operations.append(CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=public_manifest(manifest)))
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        with hub.hub_errors(repo_id, revision, token, doing="uploading", writing=True):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)
    finally:
        if quiet:
            enable_progress_bars()
    return str(info.commit_url)

