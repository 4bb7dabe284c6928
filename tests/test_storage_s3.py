"""An S3 remote (moto_server on 127.0.0.1): push, lose the local cache, get identical bytes."""

from __future__ import annotations

import filecmp
import os
import shutil
import time
from pathlib import Path

import pytest

from modelver import api
from modelver.errors import RemoteError
from tests.helpers import S3_BUCKET, dvc, free_port, model_hashes

pytestmark = pytest.mark.s3



def _use_s3(project: Path, endpoint: str, prefix: str) -> None:
    api.init(project, remote=f"s3://{S3_BUCKET}/{prefix}")
    dvc(project, "remote", "modify", "modelver", "endpointurl", endpoint)


def test_push_drop_cache_checkout_identical(project: Path, s3_endpoint: str) -> None:
    _use_s3(project, s3_endpoint, "roundtrip")
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


def test_unreachable_s3_remote(
    project: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_s3(project, f"http://127.0.0.1:{free_port()}", "nowhere")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    api.tag("tiny@v0.1.0", repo_root=project)
    started = time.monotonic()
    with pytest.raises(RemoteError):
        api.push(repo_root=project)
    assert time.monotonic() - started < 60
    assert os.listdir(project / ".dvc" / "cache")  # the local data is untouched
