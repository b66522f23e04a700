"""A small Hugging Face Hub for the tests: real HTTP on 127.0.0.1, what huggingface_hub 2.x calls.

No maintained package serves the Hub API locally (PyPI's ``hf-local-hub`` wraps a Go binary it
does not ship; ``olah`` is a read-only mirror that needs the real Hub upstream), so this is ours:
stdlib ``http.server``, threaded, a few repos built from folders. The client under test is the
real ``huggingface_hub``, pointed here with ``HF_ENDPOINT``; nothing of omni-fp8 is mocked.

Served, with the headers and error codes the Hub sends and huggingface_hub maps to its errors:

* model info (``/api/models/{id}[/revision/{rev}]``), tree listing, ``whoami-v2``;
* ``/{id}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git oid, or ``X-Linked-Etag`` =
  sha256 for LFS files), ``X-Linked-Size``, ``Accept-Ranges`` and 206 range answers;
* repo creation, branches, ``preupload``, the LFS batch API (upload, verify; objects already
  stored get no upload action, which is what makes a re-run push resumable) and NDJSON commits;
* revisions as branches or full commit shas; private and gated repos, tokens, write access;
  404/401/403 with ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``,
  ``EntryNotFound``);
* faults: a download that drops the connection part-way and then fails, a failing commit;
* a log of every request with the bytes sent, for the tests and bench/RESULTS.md.

Xet is not served: clients run with ``HF_HUB_DISABLE_XET=1``, so uploads take the LFS path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
LFS_MIN_SIZE = 10 << 20


@dataclass(frozen=True)
class Blob:
    """One file's content, on disk in the server's store."""

    path: Path
    size: int
    sha256: str
    git_oid: str

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    readers: set[str] = field(default_factory=set)  # may read a private or gated repo besides its owner
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class Logged:
    method: str
    path: str
    status: int
    sent: int  # body bytes sent
    received: int  # body bytes received


class HubServer:
    """``with HubServer(tmp) as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self, store: Path, *, tokens: dict[str, str] | None = None,
                 orgs: dict[str, set[str]] | None = None) -> None:
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})  # token -> user name
        self.orgs = dict(orgs or {})  # organization -> members with write access
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[tuple[str, str], Blob] = {}  # uploaded LFS objects by (repo, sha256), committed or not
        self.log: list[Logged] = []
        self.rate: float | None = None  # bytes per second of file bodies, all requests together; None: no limit
        self._link_free = 0.0
        self.broken: dict[str, int] = {}  # path suffix -> bytes sent before the connection drops
        self.failing_commits = 0
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- building repos ---------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path | None = None, *, private: bool = False, gated: bool = False,
                 readers: tuple[str, ...] = (), branch: str = "main") -> str:
        """Create ``repo_id`` with one commit holding ``folder``'s files; returns the commit sha."""
        self.repos[repo_id] = Repo(repo_id, private=private, gated=gated, readers=set(readers))
        return self.add_commit(repo_id, folder, branch=branch)

    def add_commit(self, repo_id: str, folder: Path | None, *, branch: str = "main",
                   files: dict[str, bytes] | None = None) -> str:
        """A new commit on ``branch`` whose files are ``folder``'s (and ``files``), nothing inherited."""
        blobs: dict[str, Blob] = {}
        if folder is not None:
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    blobs[path.relative_to(folder).as_posix()] = self._store_file(path)
        for name, data in (files or {}).items():
            blobs[name] = self._store_bytes(data)
        return self._commit(self.repos[repo_id], branch, blobs)

    def bytes_sent(self, *, method: str = "GET", contains: str = "/resolve/") -> int:
        return sum(e.sent for e in self.log if e.method == method and contains in e.path)

    def requests(self, *, method: str | None = None, contains: str = "") -> list[Logged]:
        return [e for e in self.log if (method is None or e.method == method) and contains in e.path]

    def repo_bytes(self, repo_id: str, branch: str = "main") -> int:
        repo = self.repos[repo_id]
        return sum(b.size for b in repo.commits[repo.refs[branch]].values())

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """What a repo holds at a revision, for assertions."""
        repo = self.repos[repo_id]
        sha = repo.refs.get(revision, revision)
        return {name: blob.path.read_bytes() for name, blob in repo.commits[sha].items()}

    # --- internals -------------------------------------------------------------------------------

    def _store_file(self, path: Path) -> Blob:
        sha, git = hashlib.sha256(), hashlib.sha1()
        size = path.stat().st_size
        git.update(f"blob {size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
                git.update(chunk)
        target = self.store / sha.hexdigest()
        if not target.exists():
            shutil.copyfile(path, target)
        return Blob(target, size, sha.hexdigest(), git.hexdigest())

    def _store_bytes(self, data: bytes) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        target = self.store / sha
        if not target.exists():
            target.write_bytes(data)
        git = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        return Blob(target, len(data), sha, git)

    def _commit(self, repo: Repo, branch: str, blobs: dict[str, Blob]) -> str:
        with self._lock:
            self._counter += 1
            seed = f"{repo.repo_id}:{branch}:{self._counter}:" + ",".join(f"{k}={v.git_oid}" for k, v in sorted(blobs.items()))
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = dict(blobs)
            repo.refs[branch] = sha
        return sha


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_hub = hub

    return Handler


class _Reply(Exception):
    def __init__(self, status: int, *, code: str | None = None, message: str = "", headers: dict[str, str] | None = None,
                 body: object | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.body = status, code, message, headers or {}, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format: str, *args: object) -> None:  # quiet: the hub keeps its own log
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    # --- dispatch --------------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        self._sent = 0
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        status = 500
        try:
            status = self._route(method, url.path)
        except _Reply as r:
            status = r.status
            self._error(r)
        except ConnectionError:
            status = 0  # the fault we injected
        finally:
            with self.server_hub._lock:
                self.server_hub.log.append(Logged(method, self.path, status, self._sent, len(self._body)))

    def _route(self, method: str, path: str) -> int:
        hub = self.server_hub
        if path == "/api/whoami-v2":
            user = self._user(required=True)
            return self._json({"type": "user", "name": user, "orgs": [{"name": o} for o, m in hub.orgs.items()
                                                                        if user in m],
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml()
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo = self._repo(m.group(1))
            sha = self._resolve(repo, unquote(m.group(2) or "main"))
            return self._json({"id": repo.repo_id, "sha": sha, "private": repo.private,
                               "gated": "auto" if repo.gated else False,
                               "siblings": [{"rfilename": n} for n in sorted(repo.commits[sha])]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(self._repo(m.group(1)), unquote(m.group(2)), unquote(m.group(3) or "/")[1:])
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path):
            return self._branch(self._repo(m.group(1), write=True), unquote(m.group(2)))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            return self._preupload(self._repo(m.group(1), write=True), unquote(m.group(2)))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            return self._commit(self._repo(m.group(1), write=True), unquote(m.group(2)))
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(self._repo(m.group(1), write=True))
        if m := re.fullmatch(r"/_lfs/([^/]+/[^/]+)/([0-9a-f]{64})(/verify)?", path):
            key = (m.group(1), m.group(2))
            return self._lfs_verify(key) if m.group(3) else self._lfs_put(key)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve_file(method, self._repo(m.group(1), files=True), unquote(m.group(2)),
                                      unquote(m.group(3)))
        raise _Reply(404, message=f"no route for {method} {path}")

    # --- access ----------------------------------------------------------------------------------

    def _user(self, *, required: bool = False) -> str | None:
        auth = self.headers.get("authorization") or ""
        if not auth.lower().startswith("bearer "):
            if required:
                raise _Reply(401, message="Invalid credentials in Authorization header")
            return None
        user = self.server_hub.tokens.get(auth[7:].strip())
        if user is None:
            raise _Reply(401, message="Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, files: bool = False, write: bool = False) -> Repo:
        user = self._user()
        repo = self.server_hub.repos.get(repo_id)
        allowed = repo is not None and (user == repo.namespace or user in repo.readers)
        if repo is None or (repo.private and not allowed):
            raise _Reply(404 if user else 401, code="RepoNotFound", message="Repository not found")
        if write and not self._may_write(user, repo.namespace):
            raise _Reply(403, message=f"You don't have the rights to write to {repo_id}")
        if files and repo.gated and not allowed:
            raise _Reply(403 if user else 401, code="GatedRepo",
                         message=f"Access to model {repo_id} is restricted. You must have access to it and be authenticated")
        return repo

    def _may_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.server_hub.orgs.get(namespace, set()))

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise _Reply(404, code="RevisionNotFound", message=f"Invalid rev id: {revision}")

    # --- reading ---------------------------------------------------------------------------------

    def _tree(self, repo: Repo, revision: str, prefix: str) -> int:
        sha = self._resolve(repo, revision)
        recursive = self._query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for name, blob in sorted(repo.commits[sha].items()):
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            rest = name[len(prefix.rstrip("/")) + 1:] if prefix else name
            if not recursive and "/" in rest:
                folders.add((prefix.rstrip("/") + "/" if prefix else "") + rest.split("/")[0])
                continue
            entry = {"type": "file", "path": name, "size": blob.size, "oid": blob.git_oid}
            if blob.is_lfs(name):
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
        return self._json(entries)

    def _resolve_file(self, method: str, repo: Repo, revision: str, name: str) -> int:
        hub = self.server_hub
        sha = self._resolve(repo, revision)
        blob = repo.commits[sha].get(name)
        if blob is None:
            raise _Reply(404, code="EntryNotFound", message=f"{name} does not exist", headers={"X-Repo-Commit": sha})
        broken = next((after for suffix, after in hub.broken.items() if name.endswith(suffix)), None)
        if broken is not None and broken < 0:
            raise _Reply(503, message="Service Unavailable", headers={"X-Repo-Commit": sha})
        etag = blob.sha256 if blob.is_lfs(name) else blob.git_oid
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if blob.is_lfs(name):
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        begin, end, status = 0, blob.size, 200
        if (spec := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", spec.strip())):
            begin = int(m.group(1))
            end = min(int(m.group(2)) + 1, blob.size) if m.group(2) else blob.size
            status = 206
            headers["Content-Range"] = f"bytes {begin}-{end - 1}/{blob.size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(end - begin))
        self.end_headers()
        if method == "HEAD":
            return status
        with open(blob.path, "rb") as f:
            f.seek(begin)
            self._stream(f, end - begin, broken if status == 200 else None, name)
        return status

    def _stream(self, f, count: int, drop_after: int | None, name: str) -> None:
        hub = self.server_hub
        while count > 0:
            chunk = f.read(min(count, 256 << 10))
            if drop_after is not None and self._sent + len(chunk) > drop_after:
                self.wfile.write(chunk[: max(drop_after - self._sent, 0)])
                self._sent = drop_after
                self.wfile.flush()
                self.close_connection = True
                for suffix in [s for s in hub.broken if name.endswith(s)]:
                    hub.broken[suffix] = -1  # from now on the file is unavailable: the network stays down
                raise ConnectionError("fault injected")
            if hub.rate:  # one shared link: parallel downloads split it, as on a real connection
                with hub._lock:
                    hub._link_free = max(hub._link_free, time.perf_counter()) + len(chunk) / hub.rate
                    wait = hub._link_free - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            self.wfile.write(chunk)
            self._sent += len(chunk)
            count -= len(chunk)

    # --- writing ---------------------------------------------------------------------------------

    def _create_repo(self) -> int:
        hub = self.server_hub
        user = self._user(required=True)
        payload = json.loads(self._body or b"{}")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not self._may_write(user, namespace):
            raise _Reply(403, message=f"You don't have the rights to create a model under the namespace {namespace!r}")
        if repo_id in hub.repos:
            raise _Reply(409, message="You already created this model repo", body={"url": f"{hub.url}/{repo_id}"})
        hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        hub._commit(hub.repos[repo_id], "main", {})
        return self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self) -> int:
        import yaml

        content = json.loads(self._body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            if match is not None and not isinstance(yaml.safe_load(match.group(1)) or {}, dict):
                raise ValueError("metadata is not a mapping")
        except (yaml.YAMLError, ValueError) as e:
            raise _Reply(400, message=f"Invalid metadata in README.md: {e}") from None
        return self._json({"errors": [], "warnings": []})

    def _branch(self, repo: Repo, branch: str) -> int:
        payload = json.loads(self._body or b"{}")
        if branch in repo.refs:
            raise _Reply(409, message=f"Reference refs/heads/{branch} already exists")
        base = self._resolve(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = base
        return self._json({})

    def _preupload(self, repo: Repo, revision: str) -> int:
        sha = self._resolve(repo, revision) if revision in repo.refs or revision in repo.commits else None
        current = repo.commits.get(sha, {}) if sha else {}
        files = []
        for f in json.loads(self._body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            old = current.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": (old.sha256 if lfs else old.git_oid) if old else None})
        return self._json({"files": files})

    def _lfs_batch(self, repo: Repo) -> int:
        """Objects this repo's storage already has get no upload action: a re-run push skips them."""
        hub = self.server_hub
        objects = []
        for obj in json.loads(self._body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if (repo.repo_id, obj["oid"]) not in hub.lfs:
                href = f"{hub.url}/_lfs/{repo.repo_id}/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": href + "/verify"}}
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, key: tuple[str, str]) -> int:
        if hashlib.sha256(self._body).hexdigest() != key[1]:
            raise _Reply(400, message="content does not match its oid")
        self.server_hub.lfs[key] = self.server_hub._store_bytes(self._body)
        return self._json({})

    def _lfs_verify(self, key: tuple[str, str]) -> int:
        if key not in self.server_hub.lfs:
            raise _Reply(404, message=f"object {key[1]} was not uploaded")
        return self._json({})

    def _commit(self, repo: Repo, revision: str) -> int:
        hub = self.server_hub
        if hub.failing_commits:
            hub.failing_commits -= 1
            raise _Reply(500, message="Internal Error - We're working hard to fix this as soon as possible!")
        if revision not in repo.refs:
            raise _Reply(404, code="RevisionNotFound", message=f"Invalid rev id: {revision}")
        blobs = dict(repo.commits[repo.refs[revision]])
        for line in self._body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                blobs[value["path"]] = hub._store_bytes(base64.b64decode(value["content"]))
            elif item["key"] == "lfsFile":
                if (repo.repo_id, value["oid"]) not in hub.lfs:
                    raise _Reply(400, message=f"LFS object {value['oid']} was not uploaded")
                blobs[value["path"]] = hub.lfs[(repo.repo_id, value["oid"])]
            elif item["key"] == "deletedFile":
                blobs.pop(value["path"], None)
        sha = hub._commit(repo, revision, blobs)
        return self._json({"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha,
                           "pullRequestUrl": None})

    # --- answers ---------------------------------------------------------------------------------

    def _json(self, value: object, status: int = 200, headers: dict[str, str] | None = None) -> int:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, v in (headers or {}).items():
            self.send_header(key, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            self._sent += len(data)
        return status

    def _error(self, r: _Reply) -> None:
        headers = dict(r.headers)
        if r.code:
            headers["X-Error-Code"] = r.code
        if r.message:
            headers["X-Error-Message"] = r.message
        self._json(r.body if r.body is not None else {"error": r.message}, r.status, headers)


