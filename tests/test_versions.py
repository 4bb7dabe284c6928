"""Versions as GTO tags: parsing, the registry state, tagging rules, refs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelver import api
from modelver import versions as v
from modelver.errors import (
    ArtifactNotFoundError,
    DataMissingError,
    DirtyWorkspaceError,
    InvalidVersionError,
    NotARepositoryError,
    NotPinnedError,
    UnknownRefError,
    VersionExistsError,
)
from modelver.gitrepo import GitRepo, TagRecord
from tests.helpers import git, model_hashes, set_params, train_and_commit

# --- pure parsing ---------------------------------------------------------------------------


def test_semver_parse_order_and_bump() -> None:
    a = v.Semver.parse("v1.2.3")
    assert str(a) == "v1.2.3"
    assert v.Semver.parse("v1.10.0") > v.Semver.parse("v1.9.9")
    assert str(a.bump("major")) == "v2.0.0"
    assert str(a.bump("minor")) == "v1.3.0"
    assert str(a.bump("patch")) == "v1.2.4"
    for bad in ("1.2.3", "v1.2", "v01.2.3", "v1.2.3-rc1"):
        with pytest.raises(InvalidVersionError):
            v.Semver.parse(bad)


def test_parse_version_ref() -> None:
    assert v.parse_version_ref("my-model@v0.1.0") == ("my-model", v.Semver(0, 1, 0))
    for bad in ("m@1.0.0", "m@v1", "@v1.0.0", "-m@v1.0.0"):
        with pytest.raises(InvalidVersionError) as e:
            v.parse_version_ref(bad)
        assert e.value.exit_code == 2
    assert v.parse_stage_ref("m#prod") == ("m", "prod")
    assert v.parse_stage_ref("m@v1.0.0") is None


def test_message_roundtrip_keeps_human_summary() -> None:
    meta = {"step": 300, "metrics": {"loss": 0.5}, "checkpoint": "abc.dir", "parent": None}
    msg = v.format_message("first release\nwith notes", meta)
    assert msg.splitlines()[0] == "first release"
    summary, back = v.parse_message(msg)
    assert summary == "first release\nwith notes"
    assert back == meta
    assert v.parse_message("made by gto") == ("made by gto", {})


def _rec(name: str, commit: str, meta: dict[str, object] | None = None,
         annotated: bool = True) -> TagRecord:
    msg = v.format_message("x", meta) if meta is not None else "x"
    return TagRecord(name, annotated, commit, "2026-01-01T00:00:00+00:00", msg)


def test_registry_stages_follow_gto_rules() -> None:
    recs = [
        _rec("m@v0.1.0", "c1", {"step": 10}),
        _rec("m@v0.2.0", "c2", {"step": 20}),
        _rec("m@v0.3.0", "c3"),
        _rec("m@v0.3.0!#5", "c3"),  # deregistered
        _rec("m#prod#1", "c1", {"version": "v0.1.0"}),
        _rec("m#prod#3", "c2"),  # no metadata: the version at its commit
        _rec("m#dev#2", "c1", {"version": "v0.1.0"}),
        _rec("m#dev!#4", "c1"),  # unassigned
        _rec("m@v9.0.0", "c9", annotated=False),  # lightweight: ignored
        _rec("other@v1.0.0", "c1"),
    ]
    reg = v.build_registry(recs)
    assert [str(x.version) for x in reg.of("m")] == ["v0.1.0", "v0.2.0"]
    assert reg.latest("m") is not None and str(reg.latest("m").version) == "v0.2.0"  # type: ignore[union-attr]
    prod = reg.in_stage("m", "prod")
    assert prod is not None and str(prod.version) == "v0.2.0"
    assert reg.in_stage("m", "dev") is None
    assert reg.of("m")[0].step == 10
    assert reg.stage_counters["m"] == 5
    assert reg.names() == ["m", "other"]


def test_list_tags_is_one_call_with_messages(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("x")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-qm", "c")
    repo = GitRepo(tmp_path)
    head = repo.resolve_commit("HEAD")
    repo.create_tag("m@v1.0.0", head, "line one\n\nline three")
    git(tmp_path, "tag", "light")
    recs = {r.name: r for r in repo.list_tags()}
    assert recs["m@v1.0.0"].annotated and recs["m@v1.0.0"].commit == head
    assert recs["m@v1.0.0"].message.strip() == "line one\n\nline three"
    assert not recs["light"].annotated and recs["light"].commit == head


def test_not_a_git_repository(tmp_path: Path) -> None:
    with pytest.raises(NotARepositoryError):
        api.list_versions(repo_root=tmp_path)


# --- tagging -------------------------------------------------------------------------------


def test_tag_records_step_metrics_hash(project: Path) -> None:
    res = api.tag("tiny@v0.1.0", repo_root=project)
    assert res.step == 20 and "loss" in res.metrics and res.parent is None
    lock = (project / "dvc.lock").read_text()
    assert res.checkpoint_hash.endswith(".dir") and res.checkpoint_hash in lock
    [info] = api.list_versions("tiny", repo_root=project)
    assert (info.tag, info.step, info.checkpoint_hash) == ("tiny@v0.1.0", 20, res.checkpoint_hash)
    assert info.commit == git(project, "rev-parse", "HEAD")
    msg = git(project, "tag", "-l", "--format=%(contents)", "tiny@v0.1.0")
    assert json.loads(msg.split(v.META_PREFIX)[1])["step_dir"] == "step-00000020"


def test_tag_refusals_change_nothing(project: Path) -> None:
    api.tag("tiny@v0.2.0", repo_root=project)
    before = git(project, "tag", "-l")
    with pytest.raises(VersionExistsError):
        api.tag("tiny@v0.2.0", repo_root=project)
    with pytest.raises(VersionExistsError, match="commit"):  # GTO: one version per commit
        api.tag("tiny@v0.3.0", repo_root=project)
    with pytest.raises(ArtifactNotFoundError):
        api.tag("nope@v1.0.0", repo_root=project)
    with pytest.raises(InvalidVersionError):
        api.tag("tiny@1.0", repo_root=project)
    with pytest.raises(UnknownRefError):
        api.tag("tiny@v1.0.0", rev="no-such-branch", repo_root=project)
    set_params(project, steps=30)
    train_and_commit(project, "more")
    with pytest.raises(VersionExistsError, match="not above"):
        api.tag("tiny@v0.1.0", repo_root=project)
    assert git(project, "tag", "-l") == before
    res = api.tag("tiny", bump="minor", repo_root=project)
    assert (res.version, res.parent, res.step) == ("v0.3.0", "v0.2.0", 30)


def test_tag_refuses_workspace_differing_from_lock(project: Path) -> None:
    state = project / "checkpoints" / "step-00000020" / "state.json"
    state.write_text(state.read_text() + " ")
    with pytest.raises(DirtyWorkspaceError, match="differs"):
        api.tag("tiny@v0.1.0", repo_root=project)
    assert git(project, "tag", "-l") == ""


def test_tag_ignores_unrelated_workspace_changes(project: Path) -> None:
    set_params(project, steps=50)  # not reproduced: HEAD's pin still holds
    assert api.tag("tiny@v0.1.0", repo_root=project).step == 20


def test_not_a_dvc_repository(project: Path) -> None:
    api.tag("tiny@v0.1.0", repo_root=project)
    shutil.rmtree(project / ".dvc")
    with pytest.raises(NotARepositoryError, match="DVC"):
        api.checkout("tiny@v0.1.0", to=project.parent / "x", repo_root=project)


def test_tag_refuses_unpinned_artifact(project: Path) -> None:
    git(project, "rm", "-q", "dvc.lock")
    git(project, "commit", "-qm", "drop lock")
    with pytest.raises(NotPinnedError):
        api.tag("tiny@v0.1.0", repo_root=project)


def test_promote_and_stage_refs(project: Path) -> None:
    api.tag("tiny@v0.1.0", repo_root=project)
    res = api.promote("tiny@v0.1.0", "prod", repo_root=project)
    assert res.tag == "tiny#prod#1"
    assert api.promote("tiny@v0.1.0", "prod", repo_root=project).tag is None
    r = api.resolve_ref(project, "tiny#prod")
    assert (r.kind, r.version) == ("version", "v0.1.0")
    assert api.list_versions(repo_root=project)[0].stages == ["prod"]
    with pytest.raises(UnknownRefError):
        api.resolve_ref(project, "tiny#staging")
    with pytest.raises(InvalidVersionError):
        api.promote("tiny@v0.1.0", "bad stage", repo_root=project)


def test_resolve_ref_kinds(project: Path) -> None:
    api.tag("tiny@v0.1.0", repo_root=project)
    head = git(project, "rev-parse", "HEAD")
    latest = api.resolve_ref(project, "tiny")
    assert (latest.kind, latest.tag, latest.commit, latest.step) == (
        "version", "tiny@v0.1.0", head, 20)
    by_commit = api.resolve_ref(project, head[:8])
    assert (by_commit.kind, by_commit.name, by_commit.commit) == ("commit", "tiny", head)
    assert by_commit.checkpoint_hash == latest.checkpoint_hash
    assert api.resolve_ref(project, "main").commit == head
    p = api.resolve_ref(project, "checkpoints")
    assert p.kind == "path" and p.path == (project / "checkpoints").resolve()
    with pytest.raises(UnknownRefError):
        api.resolve_ref(project, "tiny@v9.9.9")
    with pytest.raises(UnknownRefError):
        api.resolve_ref(project, "does-not-exist")


def test_checkpoint_dir_for_links_from_cache_and_remote(project: Path) -> None:
    api.tag("tiny@v0.1.0", repo_root=project)
    d = api.checkpoint_dir_for("tiny@v0.1.0", repo_root=project)
    assert d.name == "step-00000020" and (d / "MANIFEST.json").is_file()
    expected = model_hashes(project / "checkpoints" / "step-00000020")
    assert model_hashes(d) == expected
    assert api.checkpoint_dir_for("tiny@v0.1.0", repo_root=project) == d  # reused
    assert api.checkpoint_dir_for(None, repo_root=project) == project / "checkpoints" / d.name
    # from the remote only: push, drop the cache and the materialised copy
    api.push(repo_root=project)
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / ".dvc" / "tmp" / "modelver")
    d2 = api.checkpoint_dir_for("tiny@v0.1.0", repo_root=project)
    assert model_hashes(d2) == expected
    assert api.verify("tiny@v0.1.0", repo_root=project).ok


def test_verify_reports_corruption(project: Path) -> None:
    assert api.verify(repo_root=project).ok
    f = project / "checkpoints" / "step-00000010" / "model-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    res = api.verify(repo_root=project)
    bad = [c for c in res.checked if c.problems]
    assert not res.ok and [c.step for c in bad] == [10]
    assert api.verify(str(project / "checkpoints" / "step-00000020"), repo_root=project).ok


def test_checkout_refuses_corrupt_cache_before_touching_target(project: Path) -> None:
    api.tag("tiny@v0.1.0", repo_root=project)
    info = api.show("tiny@v0.1.0", repo_root=project)
    state_md5 = next(f.md5 for f in info.files if f.path == "state.json")
    obj = project / ".dvc" / "cache" / "files" / "md5" / state_md5[:2] / state_md5[2:]
    obj.chmod(0o644)
    obj.write_text(obj.read_text().replace("0", "1", 1))
    target = project.parent / "out"
    with pytest.raises(DataMissingError):  # DVC drops the bad object; the remote lacks it
        api.checkout("tiny@v0.1.0", to=target, repo_root=project)
    assert not target.exists()


def test_corrupt_cache_object_heals_from_remote(project: Path) -> None:
    api.tag("tiny@v0.1.0", repo_root=project)
    api.push(repo_root=project)
    info = api.show("tiny@v0.1.0", repo_root=project)
    assert info.in_cache and info.in_remote
    md5 = next(f.md5 for f in info.files if f.path == "model-00000.safetensors")
    obj = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:-1] + b"!")
    res = api.checkout("tiny@v0.1.0", to=project.parent / "out", repo_root=project)
    assert model_hashes(res.path) == model_hashes(project / "checkpoints" / "step-00000020")
