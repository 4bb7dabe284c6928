"""An S3 remote (moto_server on 127.0.0.1): push, lose the local cache, get identical bytes."""

from __future__ import annotations

import filecmp
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelver import api
from modelver.errors import RemoteError
from tests.registry_helpers import dvc, model_hashes

pytest_plugins = ["tests.registry_fixtures"]
pytestmark = pytest.mark.s3

BUCKET = "models"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """A moto S3 server on a free local port; yields its endpoint URL."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():  # CI installs it (the test extra): there a missing server is a failure
        if os.environ.get("CI"):
            pytest.fail("moto_server is not installed")
        pytest.skip("moto_server is not installed")
    port = _free_port()
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
def s3_env(moto: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, val in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, val)
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=BUCKET)
    return moto


def _use_s3(project: Path, endpoint: str, prefix: str) -> None:
    api.init(project, remote=f"s3://{BUCKET}/{prefix}")
    dvc(project, "remote", "modify", "modelver", "endpointurl", endpoint)


def test_push_drop_cache_checkout_identical(project: Path, s3_env: str) -> None:
    _use_s3(project, s3_env, "roundtrip")
    api.tag("tiny@v0.1.0", repo_root=project)
    pushed = api.push(repo_root=project)
    assert pushed.objects > 0
    assert api.show("tiny@v0.1.0", repo_root=project).in_remote is True
    original = project.parent / "original"
    shutil.copytree(project / "checkpoints", original)
    shutil.rmtree(project / ".dvc" / "cache")
    assert api.show("tiny@v0.1.0", repo_root=project).in_cache is False
    res = api.checkout("tiny@v0.1.0", repo_root=project, force=True)
    assert res.step == 20
    for step_dir in original.iterdir():
        names = [p.name for p in step_dir.iterdir()]
        _, mismatch, errors = filecmp.cmpfiles(step_dir, project / "checkpoints" / step_dir.name,
                                               names, shallow=False)
        assert not mismatch and not errors
    assert model_hashes(res.path) == model_hashes(original / "step-00000020")
    assert api.verify("tiny@v0.1.0", repo_root=project).ok


def test_unreachable_s3_remote(project: Path, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_s3(project, f"http://127.0.0.1:{_free_port()}", "nowhere")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    api.tag("tiny@v0.1.0", repo_root=project)
    started = time.monotonic()
    with pytest.raises(RemoteError):
        api.push(repo_root=project)
    assert time.monotonic() - started < 60
    assert os.listdir(project / ".dvc" / "cache")  # the local data is untouched
