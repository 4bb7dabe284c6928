"""Shared fixtures: every test runs with its own HOME and Git identity, never the user's.

Helpers that are not fixtures are in tests/helpers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    S3_BUCKET,
    copy_project,
    free_port,
    git,
    isolated_env_vars,
    make_project,
    run,
    write_gitconfig,
    write_metrics,
)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    for key, value in isolated_env_vars(home).items():
        monkeypatch.setenv(key, value)
    write_gitconfig(home)
    monkeypatch.delenv("MODELVER_DEBUG", raising=False)
    return home


# --- a trained Git + DVC project ----------------------------------------------------------------


@pytest.fixture(scope="session")
def template_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built once per session (training is the slow part); tests get copies."""
    home = tmp_path_factory.mktemp("template-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in isolated_env_vars(home).items():
            mp.setenv(key, value)
        write_gitconfig(home)
        yield make_project(tmp_path_factory.mktemp("template") / "proj")


@pytest.fixture
def project(template_project: Path, tmp_path: Path) -> Path:
    """A private copy of the template with its own default remote (under this test's HOME)."""
    return copy_project(template_project, tmp_path / "proj")


@pytest.fixture
def gated(project: Path) -> Path:
    """The tiny project with a Git-tracked metrics file, v0.1.0 in production at 20 steps."""
    with open(project / "dvc.yaml", "a") as f:
        f.write("metrics:\n  - metrics.json\n")
    write_metrics(project, accuracy=0.90, eval={"f1": 0.80})
    git(project, "add", "-A")
    git(project, "commit", "-qm", "metrics")
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    assert run(project, "promote", "tiny@v0.1.0", "production", "-q").exit_code == 0
    return project


# --- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto_server) on a free 127.0.0.1 port, for the whole session."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():  # CI installs it (the test extra): there a missing server is a failure
        if os.environ.get("CI"):
            pytest.fail("moto_server is not installed")
        pytest.skip("moto_server is not installed")
    port = free_port()
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
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_endpoint(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The moto endpoint with dummy credentials set and the bucket S3_BUCKET created."""
    for k, val in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, val)
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    if S3_BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=S3_BUCKET)
    return moto_server


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """An initialised one-process gloo group (torch.distributed code paths in this process)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
