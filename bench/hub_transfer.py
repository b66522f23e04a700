"""What a Hugging Face Hub source costs on the wire, and what overlapping download and conversion saves.

Serves a real-width Qwen-Image checkpoint (``checkpoints.write_qwen_image``) from the tests' local
Hub server (tests/hub_server.py, real HTTP on 127.0.0.1, huggingface_hub as the client) and runs
``omni-convert`` in fresh processes pointed at it with ``HF_ENDPOINT``, each with its own cache:

* ``inspect``: bytes fetched against the repo's size (only configs and shard headers should move);
* first ``convert``: bytes fetched; second ``convert`` on the same cache: bytes fetched (should be 0);
* overlap: with the server's bandwidth capped (one shared link, ``--rates`` in MB/s), the wall
  time of ``omni-convert convert REPO`` (shards converted as they arrive) against downloading
  first (``snapshot_download``) and converting the downloaded folder after.

Byte counts come from the server's log (file bodies it sent). Times vary on shared machines; the
ratios within one run are what to compare.

    python bench/hub_transfer.py --blocks 1 --rates 100,400
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from checkpoints import write_qwen_image  # noqa: E402
from hub_server import HubServer  # noqa: E402

REPO = "bench/qwen-image-width"


def run(env: dict[str, str], *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--shard-mb", type=int, default=150)
    parser.add_argument("--rates", default="100,400", help="link speeds to try, MB/s, comma-separated")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="omni-fp8-hub-bench-"))
    try:
        src = write_qwen_image(work / "src", blocks=args.blocks, shard_bytes=args.shard_mb * 10**6)
        with HubServer(work / "store") as hub:
            hub.add_repo(REPO, src)
            size = hub.repo_bytes(REPO)
            shards = len(list(src.glob("*.safetensors")))
            base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
            base.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
            omni = [sys.executable, "-m", "omni_fp8.converter.cli"]

            def env(name: str) -> dict[str, str]:
                return {**base, "HF_HOME": str(work / name)}

            print(f"repo: {size / 1e9:.2f} GB in {shards} shards ({args.blocks} real-width blocks)")
            hub.log.clear()
            run(env("inspect"), *omni, "inspect", REPO)
            got = hub.bytes_sent()
            print(f"inspect:        {got:>13,} B fetched = {got / size:.5f} of the repo "
                  f"({sum(e.status == 206 for e in hub.log)} header range reads + configs)")
            hub.log.clear()
            run(env("convert"), *omni, "convert", REPO, str(work / "out1"), "-q")
            first = hub.bytes_sent()
            hub.log.clear()
            run(env("convert"), *omni, "convert", REPO, str(work / "out2"), "-q")
            second = hub.bytes_sent()
            api = len(hub.requests(contains="/api/models"))
            print(f"convert, 1st:   {first:>13,} B fetched = {first / size:.4f} of the repo (headers read twice: "
                  "remotely to plan, then in the file)")
            print(f"convert, 2nd:   {second:>13,} B fetched ({api} API request: which commit main is)")
            shutil.rmtree(work / "out1")
            shutil.rmtree(work / "out2")

            cached = work / "convert" / "hub" / f"models--{REPO.replace('/', '--')}"
            fixed = run(base, *omni, "inspect", str(cached))
            local = run(base, *omni, "convert", str(cached), str(work / "out3"), "-q")
            print(f"convert from the cache alone: {local:.1f} s, of which {fixed:.1f} s start-up and planning "
                  "(as long as inspect)")
            for name in ("inspect", "convert", "out3"):
                shutil.rmtree(work / name)
            for rate in (float(r) for r in args.rates.split(",")):
                hub.rate = rate * 1e6
                fetch = (f"from huggingface_hub import snapshot_download; "
                         f"snapshot_download({REPO!r}, max_workers=1)")
                download = run(env(f"serial-{rate:g}"), sys.executable, "-c", fetch)
                snapshot = work / f"serial-{rate:g}" / "hub" / f"models--{REPO.replace('/', '--')}"
                then = run(env(f"serial-{rate:g}"), *omni, "convert", str(snapshot), str(work / "out4"), "-q",
                           "--force")
                overlapped = run(env(f"overlap-{rate:g}"), *omni, "convert", REPO, str(work / "out5"), "-q",
                                 "--force")
                serial = download + then
                for name in (f"serial-{rate:g}", f"overlap-{rate:g}", "out4", "out5"):
                    shutil.rmtree(work / name)
                print(f"link {rate:g} MB/s: download {download:.1f} s + convert {then:.1f} s = {serial:.1f} s; "
                      f"overlapped {overlapped:.1f} s = {overlapped / serial:.2f}x "
                      f"(floor max(download, convert) = {max(download, then) / serial:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
