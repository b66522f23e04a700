"""Hugging Face Hub repos as sources and destinations, end to end.

The real huggingface_hub client talks to a real HTTP server on 127.0.0.1 (tests/hub_server.py)
serving repos built from the tiny fixtures; nothing of omni-fp8 is mocked. huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import: the end-to-end cases run
``omni-convert`` in a subprocess with those variables set, the others patch
``huggingface_hub.constants`` the same way for this process (``hub_env``). Every test has its
own cache under tmp_path; the real one is never touched. Xet is switched off
(HF_HUB_DISABLE_XET=1): the server speaks the LFS upload protocol, not Xet's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import same_bits
from hub_server import HubServer

from omni_fp8 import convert, load_transformer, open_source, push, verify
from omni_fp8.converter.cli import main
from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image
from omni_fp8.converter.errors import (
    HubAccessError,
    OutputExistsError,
    SourceNotFoundError,
    VerificationError,
)
from omni_fp8.converter.source import MANIFEST_NAME

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture(scope="session")
def hub(tmp_path_factory, qwen_src, qwen_pipeline):
    """One server for the session: public, private and gated repos, and one with two commits."""
    with HubServer(tmp_path_factory.mktemp("hub-store"), tokens=TOKENS, orgs={"fp8-org": {"alice"}}) as server:
        server.add_repo("org/qwen", qwen_src)
        server.add_repo("org/qwen-image", qwen_pipeline)
        server.add_repo("org/private", qwen_src, private=True, readers=("alice",))
        server.add_repo("org/gated", qwen_src, gated=True, readers=("alice",))
        other = save_checkpoint(tiny_qwen_image(seed=7), tmp_path_factory.mktemp("other") / "transformer")
        server.first_commit = server.add_repo("org/moving", qwen_src)  # main moves on to other weights
        server.add_commit("org/moving", qwen_src, branch="v1")
        server.add_commit("org/moving", other)
        yield server


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """This process and its subprocesses talk to ``hub``, with a fresh cache and no token."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    patched = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.log.clear()
    hub.broken.clear()
    hub.failing_commits = 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    return SimpleNamespace(hub=hub, home=home, cache=home / "hub", env=env)


def cli(env: dict[str, str], *args: object) -> subprocess.CompletedProcess[str]:
    """``omni-convert`` in a fresh interpreter: huggingface_hub reads the environment as a user's would."""
    return subprocess.run([sys.executable, "-m", "omni_fp8.converter.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(code: int, stderr: str, fragment: str) -> str:
    assert code == 1, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in stderr, stderr
    assert fragment in line, line
    return line


def cached_files(cache: Path, repo_id: str) -> set[str]:
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in snapshots.iterdir() for p in s.rglob("*") if p.is_file()} \
        if snapshots.is_dir() else set()


def file_hashes(out: Path) -> dict[str, str]:
    return {rel: rec["sha256"] for rel, rec in json.loads((out / MANIFEST_NAME).read_text())["files"].items()}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(same_bits(sa[k], sb[k]) for k in sa)


# --- sources ------------------------------------------------------------------------------------

def test_pipeline_repo_converts_like_the_folder_and_a_second_run_downloads_nothing(hub_env, qwen_pipeline, tmp_path):
    first = cli(hub_env.env, "convert", "org/qwen-image", tmp_path / "out", "-q")
    assert first.returncode == 0, first.stderr
    convert(qwen_pipeline, tmp_path / "local", progress=False)
    assert file_hashes(tmp_path / "out") == file_hashes(tmp_path / "local")  # same bytes, every file
    assert verify(tmp_path / "out").ok
    source = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["source"]
    commit = hub_env.hub.repos["org/qwen-image"].refs["main"]
    assert (source["type"], source["repo_id"], source["revision"], source["commit"]) == (
        "hub", "org/qwen-image", "main", commit)
    shown = run("inspect", tmp_path / "out").stdout
    assert f"Source:   org/qwen-image@main (commit {commit[:12]})" in shown

    fetched = hub_env.hub.bytes_sent()
    assert fetched >= hub_env.hub.repo_bytes("org/qwen-image") - 100  # everything but the hidden files
    hub_env.hub.log.clear()
    convert("org/qwen-image", tmp_path / "again", progress=False)  # same cache, this process
    assert hub_env.hub.bytes_sent() == 0 and not hub_env.hub.requests(contains="/resolve/")
    assert [e.path for e in hub_env.hub.log if e.path.startswith("/api/models")] == [
        "/api/models/org/qwen-image/revision/main"]  # one request: which commit main is now
    assert file_hashes(tmp_path / "again") == file_hashes(tmp_path / "out")

    offline = {**hub_env.env, "HF_HUB_OFFLINE": "1"}
    hub_env.hub.log.clear()
    third = cli(offline, "convert", "org/qwen-image", tmp_path / "offline", "-q")
    assert third.returncode == 0, third.stderr
    assert hub_env.hub.log == []  # not one request
    assert file_hashes(tmp_path / "offline") == file_hashes(tmp_path / "out")


def test_subfolder_converts_and_downloads_only_that_folder(hub_env, qwen_src, tmp_path):
    result = run("convert", "org/qwen-image", tmp_path / "out", "--subfolder", "transformer", "-q", "--json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model-00001-of-00001.safetensors",
        "diffusion_pytorch_model.safetensors.index.json", MANIFEST_NAME]
    assert json.loads(result.stdout)["source"]["subfolder"] == "transformer"
    cached = cached_files(hub_env.cache, "org/qwen-image")
    assert not [f for f in cached if not f.startswith("transformer/") and not f.endswith((".json", ".md"))]
    assert not [f for f in cached if f.startswith(("text_encoder/", "vae/")) and f.endswith(".safetensors")]
    convert(qwen_src, tmp_path / "local", progress=False)
    local = {k.removeprefix("transformer/"): v for k, v in file_hashes(tmp_path / "local").items()}
    assert file_hashes(out) == local


def test_a_single_file_target_downloads_only_the_transformer(hub_env, tmp_path):
    result = convert("org/qwen-image", tmp_path / "qwen.safetensors", target="comfyui", progress=False)
    assert result.output.is_file()
    weights = {f for f in cached_files(hub_env.cache, "org/qwen-image") if f.endswith(".safetensors")}
    assert weights and all(f.startswith("transformer/") for f in weights)


def test_revision_pins_a_commit_or_branch(hub_env, qwen_src, tmp_path):
    convert(qwen_src, tmp_path / "local", progress=False)
    pinned = hub_env.hub.first_commit
    for revision in (pinned, "v1"):
        result = convert("org/moving", tmp_path / revision, revision=revision, progress=False)
        assert result.manifest["source"]["revision"] == revision
        assert file_hashes(tmp_path / revision) == file_hashes(tmp_path / "local")
    main_now = convert("org/moving", tmp_path / "main", progress=False)
    assert main_now.manifest["source"]["commit"] == hub_env.hub.repos["org/moving"].refs["main"] != pinned
    assert file_hashes(tmp_path / "main") != file_hashes(tmp_path / "local")


def test_inspect_reads_only_headers_and_configs(hub_env, qwen_src):
    result = run("inspect", "org/qwen", "--json")
    assert result.exit_code == 0, result.output
    local = json.loads(run("inspect", qwen_src, "--json").stdout)
    remote = json.loads(result.stdout)
    assert remote["summary"] == local["summary"] and remote["tensors"] == local["tensors"]
    assert remote["source"]["repo_id"] == "org/qwen"
    assert not [f for f in cached_files(hub_env.cache, "org/qwen") if f.endswith(".safetensors")]
    shard_reads = [e for e in hub_env.hub.requests(method="GET") if e.path.endswith(".safetensors")]
    assert len(shard_reads) == 4 and {e.status for e in shard_reads} == {206}  # one range request per shard
    assert run("inspect", "org/qwen").stdout.startswith("Source:   org/qwen@main (commit ")


def test_a_local_folder_wins_over_a_repo_id(hub_env, qwen_src, tmp_path, monkeypatch):
    shutil.copytree(qwen_src, tmp_path / "org" / "qwen")
    monkeypatch.chdir(tmp_path)
    assert open_source("org/qwen").origin["type"] == "local"
    assert hub_env.hub.log == []


def test_load_transformer_from_repos(hub_env, qwen_src, tmp_path):
    """A BF16 repo quantized while loading equals a converted repo loaded: same bits."""
    convert(qwen_src, tmp_path / "fp8", progress=False)
    hub_env.hub.add_repo("org/qwen-fp8", tmp_path / "fp8")
    converted = load_transformer("org/qwen-fp8", progress=False)
    quantized = load_transformer("org/qwen", quantization="fp8", progress=False)
    assert same_state(converted, quantized)
    assert same_state(converted, load_transformer(tmp_path / "fp8", progress=False))


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo,token,error,fragment", [
    ("org/nothing-here", None, SourceNotFoundError, "no such local folder, and no such repo on"),
    ("org/private", None, SourceNotFoundError, "or it is private and no token was given"),
    ("org/private", "tok-bob", SourceNotFoundError, "or it is private and the token given cannot see it"),
    ("org/gated", None, HubAccessError, "a gated repo, and no token was given; accept its conditions at"),
    ("org/gated", "tok-bob", HubAccessError, "the token given has not been granted access"),
    ("org/qwen", "tok-nobody", HubAccessError, "the Hub refused the token"),
])
def test_access_errors(hub_env, repo, token, error, fragment):
    with pytest.raises(error, match=fragment):
        open_source(repo, token=token)


def test_private_and_gated_repos_open_with_a_token(hub_env, monkeypatch):
    assert open_source("org/private", token="tok-alice").class_name == "QwenImageTransformer2DModel"
    monkeypatch.setenv("HF_TOKEN", "tok-alice")  # read by huggingface_hub at each request, as diffusers relies on
    assert open_source("org/gated").origin["repo_id"] == "org/gated"


def test_cli_errors_are_one_line(hub_env, tmp_path):
    result = CliRunner().invoke(main, ["convert", "org/qwen", str(tmp_path / "out"), "--revision", "nope"])
    one_line_error(result.exit_code, result.stderr, "org/qwen: no revision 'nope' (a branch, tag or commit)")
    result = CliRunner().invoke(main, ["inspect", "org/gated"])
    one_line_error(result.exit_code, result.stderr, "a gated repo")
    result = CliRunner().invoke(main, ["convert", "org/qwen-image", str(tmp_path / "out"), "--subfolder", "nope"])
    one_line_error(result.exit_code, result.stderr, "org/qwen-image@main: nope: no such folder")
    result = CliRunner().invoke(main, ["convert", str(tmp_path), str(tmp_path / "out"), "--revision", "v1"])
    one_line_error(result.exit_code, result.stderr, "a local folder has no revisions")
    assert not (tmp_path / "out").exists()


def test_offline_with_nothing_cached(hub_env, tmp_path):
    result = cli({**hub_env.env, "HF_HUB_OFFLINE": "1"}, "convert", "org/qwen", tmp_path / "out")
    one_line_error(result.returncode, result.stderr, "org/qwen: HF_HUB_OFFLINE is set and")
    assert "not in the Hugging Face cache" in result.stderr and str(hub_env.cache) in result.stderr
    assert not (tmp_path / "out").exists() and hub_env.hub.log == []


def test_network_failure_mid_download_then_a_rerun_resumes(hub_env, tmp_path):
    order = list(dict.fromkeys(json.loads((hub_env.hub.files("org/qwen")[
        "diffusion_pytorch_model.safetensors.index.json"]))["weight_map"].values()))
    hub_env.hub.broken[order[2]] = 5000  # the third shard read drops after 5 kB, then the Hub stays down
    result = CliRunner().invoke(main, ["convert", "org/qwen", str(tmp_path / "out"), "-q"])
    line = one_line_error(result.exit_code, result.stderr, f"the Hub answered 503 (Service Unavailable) while downloading {order[2]}")
    assert "run the same command again: finished files are reused from the cache" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-home"]  # no output, no staging folder

    hub_env.hub.broken.clear()
    hub_env.hub.log.clear()
    result = CliRunner().invoke(main, ["convert", "org/qwen", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    fetched = {e.path.rsplit("/", 1)[-1] for e in hub_env.hub.requests(method="GET") if e.path.endswith(".safetensors")}
    assert fetched == set(order[2:])  # the first two came from the cache
    assert verify(tmp_path / "out").ok


# --- push ---------------------------------------------------------------------------------------

@pytest.fixture
def converted(hub_env, tmp_path):
    """org/qwen converted from the Hub (so the card has a base model), as a user would."""
    convert("org/qwen", tmp_path / "out", progress=False)
    hub_env.hub.log.clear()
    return tmp_path / "out"


def test_push_then_load_gives_the_same_weights(hub_env, converted, tmp_path):
    (converted / ".cache" / "huggingface").mkdir(parents=True)  # what `hf download --local-dir` leaves
    (converted / ".cache" / "huggingface" / "secret").write_text("tok-alice")
    result = cli({**hub_env.env, "HF_TOKEN": "tok-alice"}, "push", converted, "alice/qwen-fp8", "--json", "-q")
    assert result.returncode == 0, result.stderr
    pushed = hub_env.hub.files("alice/qwen-fp8")
    manifest = json.loads(pushed[MANIFEST_NAME])
    assert sorted(pushed) == sorted({*manifest["files"], MANIFEST_NAME})
    for name, data in pushed.items():  # no token, no path of this machine, in any file
        assert b"tok-alice" not in data and str(tmp_path).encode() not in data, name
    assert "path" not in manifest["source"] and manifest["source"]["repo_id"] == "org/qwen"
    assert json.loads(result.stdout)["commit_url"].startswith(hub_env.hub.url + "/alice/qwen-fp8/commit/")

    assert same_state(load_transformer("alice/qwen-fp8", revision="main", progress=False),
                      load_transformer(converted, progress=False))
    assert verify(converted).ok  # the card is in the manifest
    shutil.rmtree(converted / ".cache")  # not ours: --force would refuse to delete it
    convert("org/qwen", converted, force=True, progress=False)  # the card is ours: --force may replace the folder


def test_model_card(hub_env, converted):
    from huggingface_hub import ModelCard

    push(converted, "alice/card", token="tok-alice", progress=False)
    card = ModelCard(hub_env.hub.files("alice/card")["README.md"].decode())
    data = card.data.to_dict()
    assert data["base_model"] == "org/qwen" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "diffusers" and {"fp8", "omni-fp8"} <= set(data["tags"])
    text = card.text
    for fragment in ('load_transformer("alice/card"', "omni-convert inspect alice/card", "| preset | `qwen-image` |",
                     "matches `img_in` of ignored_layers", "Transformer weights: 664.42 KB -> 369.62 KB",
                     "28 of 34 Linear layers in FP8", hub_env.hub.repos["org/qwen"].refs["main"]):
        assert fragment in text, fragment


def test_push_dry_run_and_a_card_of_your_own(hub_env, converted, tmp_path):
    result = run("push", converted, "alice/dry", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "README.md" in result.stdout and "would push 5 files" in result.stdout
    assert "alice/dry" not in hub_env.hub.repos and not hub_env.hub.requests(method="POST")
    assert (converted / "README.md").read_text().startswith("---\nbase_model: org/qwen\n")
    assert verify(converted).ok

    (converted / "README.md").write_text("# my own card\n")
    result = run("push", converted, "alice/mine", "--token", "tok-alice", "-q")
    assert result.exit_code == 0, result.output
    assert hub_env.hub.files("alice/mine")["README.md"] == b"# my own card\n"
    assert verify(converted).ok
    with pytest.raises(OutputExistsError, match="its model card README.md was written by you"):
        convert("org/qwen", converted, force=True, progress=False)  # --force never deletes your card
    push(converted, "alice/mine", token="tok-alice", overwrite_card=True, progress=False)
    assert hub_env.hub.files("alice/mine")["README.md"].startswith(b"---\nbase_model: org/qwen")


def test_push_to_a_branch(hub_env, converted):
    push(converted, "fp8-org/qwen", token="tok-alice", revision="fp8", commit_message="FP8 weights", progress=False)
    repo = hub_env.hub.repos["fp8-org/qwen"]
    assert "README.md" in hub_env.hub.files("fp8-org/qwen", "fp8") and not repo.commits[repo.refs["main"]]


def test_push_refuses_a_folder_that_fails_verify(hub_env, converted):
    shard = sorted(converted.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    result = CliRunner().invoke(main, ["push", str(converted), "alice/bad", "--token", "tok-alice", "-q"])
    one_line_error(result.exit_code, result.stderr, f"differ from its manifest ({shard.name}: SHA-256 differs")
    assert not hub_env.hub.log and not (converted / "README.md").exists()
    with pytest.raises(VerificationError):
        push(converted, "alice/bad", token="tok-alice", progress=False)


@pytest.mark.parametrize("token,fragment", [
    ("tok-bob", "alice/no-access: your token cannot write there"),
    (None, "alice/no-access: pushing needs a token with write access, and none was given"),
])
def test_push_without_write_access(hub_env, converted, token, fragment):
    args = ["push", str(converted), "alice/no-access", "-q"] + (["--token", token] if token else [])
    result = CliRunner().invoke(main, args)
    one_line_error(result.exit_code, result.stderr, fragment)
    assert "alice/no-access" not in hub_env.hub.repos


def test_a_failed_push_resumes_without_uploading_again(hub_env, converted):
    hub_env.hub.failing_commits = 1
    result = CliRunner().invoke(main, ["push", str(converted), "alice/resume", "--token", "tok-alice", "-q"])
    one_line_error(result.exit_code, result.stderr, "alice/resume: the Hub answered 500")
    assert len(hub_env.hub.requests(method="PUT")) == 1  # the shard reached the Hub; the commit did not
    hub_env.hub.log.clear()
    assert not push(converted, "alice/resume", token="tok-alice", progress=False).dry_run
    assert not hub_env.hub.requests(method="PUT")  # nothing uploaded twice
    assert MANIFEST_NAME in hub_env.hub.files("alice/resume")


def test_push_refuses_staging_folders_and_bad_repo_ids(hub_env, converted, tmp_path):
    staging = tmp_path / ".out.omni-fp8-partial-1-abc"
    shutil.copytree(converted, staging)
    result = CliRunner().invoke(main, ["push", str(staging), "alice/x", "--dry-run"])
    one_line_error(result.exit_code, result.stderr, "an unfinished omni-fp8 output")
    result = CliRunner().invoke(main, ["push", str(converted), "not a repo", "--dry-run"])
    one_line_error(result.exit_code, result.stderr, "is not a Hub repo id")


# --- suggest ------------------------------------------------------------------------------------

def test_suggest_reads_a_repo_and_its_recorded_inputs(hub_env, qwen_src, tmp_path):
    from test_sensitivity import recorded_calls

    from omni_fp8 import save_inputs

    shutil.copytree(qwen_src, tmp_path / "repo")
    save_inputs(tmp_path / "repo" / "sample_inputs.safetensors", recorded_calls(load_transformer(qwen_src, progress=False), n=1))
    hub_env.hub.add_repo("org/with-inputs", tmp_path / "repo")
    result = run("suggest", "org/with-inputs", "-q", "--max-error", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("omni-convert convert org/with-inputs OUT --preset none")
    assert "sample_inputs.safetensors" in cached_files(hub_env.cache, "org/with-inputs")
