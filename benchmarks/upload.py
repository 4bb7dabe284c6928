"""Upload throughput of the node-local tier against boto3, to a moto_server S3 on 127.0.0.1.

    python benchmarks/upload.py [--files 8] [--mib 32] [--runs 5] [--dir DIR]

A Git + DVC repository in a temporary directory whose remote is a bucket on a moto_server
(dummy credentials), as in the node-local tests. Each run writes --files new files of random
bytes (--mib each) and a manifest naming them, then ``os.sync()``, untimed, and uploads those
same bytes with:
  modelver tier    ``RemoteTier.upload`` of the step directory, as a node-local save does
                   (one rank: MD5 and PUT of each file, ``nodelocal.PUTS`` at once, then the
                   ``.dir`` listing, the check that the remote holds every object, the run
                   record), until ``outcome()`` returns
  boto3 one by one ``client.upload_file`` of each file in turn, default ``TransferConfig``
                   (multipart above 8 MiB, up to 10 threads per file)
  boto3 all at once one ``TransferManager`` with every file submitted, default
                   ``TransferConfig`` (10 requests in flight in all): what ``aws s3 cp
                   --recursive`` does
The bucket is emptied after every upload, untimed; the methods take turns, rotated. MB/s
(10^6 bytes) of the data files' bytes, median over --runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import torch.distributed as dist
from boto3.s3.transfer import TransferConfig, create_transfer_manager

from modelver import api
from modelver.checkpoint import format as fmt
from modelver.nodelocal import RemoteTier

BUCKET = "modelver-bench"


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto_server on a free 127.0.0.1 port (as tests/conftest.py starts it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_repo(tmp: Path, endpoint: str) -> Path:
    """A Git + DVC repository whose remote ``s3`` is a prefix of the bucket on ``endpoint``."""
    root = tmp / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    api.init(root, remote=str(tmp / "unused-remote"))
    dvc = [str(Path(sys.executable).with_name("dvc")), "remote"]
    subprocess.run([*dvc, "add", "s3", f"s3://{BUCKET}/dvc"], cwd=root, check=True)
    subprocess.run([*dvc, "modify", "s3", "endpointurl", endpoint], cwd=root, check=True)
    return root


def write_step(step: Path, files: int, size: int, number: int) -> tuple[list[str], Any]:
    """New random data files and a manifest listing them (no MD5s: a node-local save's)."""
    step.mkdir(parents=True)
    entries = {}
    for i in range(files):
        name = f"model-{i:05d}.safetensors"
        (step / name).write_bytes(os.urandom(size))
        entries[name] = fmt.FileEntry(name, size, f"{number}-{i}")
    manifest = fmt.Manifest(step=number, epoch=None, created="2026-12-01T00:00:00+00:00",
                            metrics={}, files=entries, tensors={}, run="bench")
    (step / fmt.MANIFEST).write_text(json.dumps(manifest.to_json()))
    return [*entries, fmt.MANIFEST], manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--mib", type=float, default=32.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    size = int(a.mib * (1 << 20))
    work = Path(tempfile.mkdtemp(prefix="mv-bench-upload-", dir=a.dir))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        root = s3_repo(work, endpoint) / "checkpoints"
        root.mkdir()
        tier = RemoteTier(root, "s3", "bench")

        def modelver_tier(step: Path, names: list[str], manifest: Any) -> None:
            tier.upload(step, names, manifest)
            problem = tier.outcome()
            if problem is not None:
                raise RuntimeError(problem)

        def one_by_one(step: Path, names: list[str], _: Any) -> None:
            for n in names:
                client.upload_file(str(step / n), BUCKET, f"boto/{step.name}/{n}")

        def all_at_once(step: Path, names: list[str], _: Any) -> None:
            with create_transfer_manager(client, TransferConfig()) as manager:
                futures = [manager.upload(str(step / n), BUCKET, f"boto/{step.name}/{n}")
                           for n in names]
                for f in futures:
                    f.result()

        def empty_bucket() -> None:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})

        methods: dict[str, Callable[[Path, list[str], Any], None]] = {
            "modelver tier": modelver_tier,
            "boto3 one by one": one_by_one,
            "boto3 all at once": all_at_once,
        }
        seconds: dict[str, list[float]] = {k: [] for k in methods}
        order = list(methods)
        number = 0
        try:
            for run in range(a.runs + 1):  # the first run warms up (connections, imports)
                turn = run % len(order)  # rotated: no method always goes first
                for name in order[turn:] + order[:turn]:
                    number += 1
                    step = root / fmt.step_dirname(number)
                    names, manifest = write_step(step, a.files, size, number)
                    os.sync()  # their writeback is not the upload's cost
                    t0 = time.perf_counter()
                    methods[name](step, names, manifest)
                    seconds[name].append(time.perf_counter() - t0)
                    empty_bucket()
                    shutil.rmtree(step)
        finally:
            tier.close()
            dist.destroy_process_group()
            shutil.rmtree(work, ignore_errors=True)
    data = a.files * size
    rate = {k: data / statistics.median(v[1:]) / 1e6 for k, v in seconds.items()}
    print(f"{a.files} files of {a.mib:g} MiB ({data / (1 << 20):.0f} MiB) to moto_server on "
          f"127.0.0.1, median of {a.runs} runs after one warm-up, boto3 {boto3.__version__}, "
          f"{os.cpu_count()} cores")
    print(f"{'':18} {'s':>7} {'MB/s':>7} {'x all at once':>14} {'x one by one':>13}")
    for name, r in rate.items():
        print(f"{name:18} {data / r / 1e6:7.2f} {r:7.0f} {r / rate['boto3 all at once']:14.2f} "
              f"{r / rate['boto3 one by one']:13.2f}")


if __name__ == "__main__":
    main()
