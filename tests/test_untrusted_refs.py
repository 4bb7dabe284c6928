"""Tags, dvc.yaml/dvc.lock, listings and run records are data others wrote (issue 11).

Crafted with real `git tag -a`, real commits and a real DVC remote in tmp_path: every refusal is
one error line naming the field and the value, and nothing outside the repository (nor the
workspace) is written or deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from modelver import api
from modelver import versions as v
from modelver.checkpoint import CheckpointManager
from modelver.checkpoint.format import read_manifest
from modelver.errors import (
    MalformedDataError,
    ModelverError,
    ModelverWarning,
    NotPinnedError,
    UnsafePathError,
)
from modelver.materialize import tree
from modelver.publish import Publisher
from modelver.runs import RunRecord, read_run_records
from modelver.storage import TreeFile, read_config
from modelver.storage.dvc import DvcStorage
from modelver.storage.dvcfile import find_locked_out, parse_artifacts
from tests.helpers import dvc, git, init_repo, one_error_line, run


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path of the workspace under ``root`` (not .git, .dvc) with its size and mtime."""
    found = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".dvc")]
        for name in [*files, *dirnames]:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return found


def real_meta(project: Path) -> dict[str, object]:
    """Tag the project's HEAD for real and return the metadata modelver wrote."""
    api.tag("tiny@v0.1.0", repo_root=project)
    msg = git(project, "tag", "-l", "--format=%(contents)", "tiny@v0.1.0")
    return dict(json.loads(msg.split(v.META_PREFIX)[1]))


def craft(project: Path, tag: str, meta: object, commit: str = "HEAD") -> None:
    """An annotated tag whose `modelver:` line says ``meta`` (a dict, or raw text)."""
    line = meta if isinstance(meta, str) else json.dumps(meta)
    git(project, "tag", "-a", tag, "-m", f"crafted\n\n{v.META_PREFIX}{line}", commit)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory outside the repository that nothing may touch."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    return d


def assert_untouched(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (victim / "keep.txt").read_text() == "precious"


# --- class 1: paths in tags ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested-dotdot"])
def test_tag_path_outside_refused_by_resume_and_checkout(
    project: Path, victim: Path, tmp_path: Path, kind: str
) -> None:
    meta = real_meta(project)
    path = {"dotdot": "../victim", "absolute": str(victim),
            "nested-dotdot": "checkpoints/../../victim"}[kind]
    craft(project, "tiny@v0.2.0", {**meta, "path": path})
    before = snapshot(project)
    branches = git(project, "branch", "--list")
    worktree = tmp_path / "wt"
    line = one_error_line(run(project, "resume", "tiny@v0.2.0", "--worktree", str(worktree),
                              "--no-repro"))
    assert "path" in line and repr(path) in line
    line = one_error_line(run(project, "checkout", "tiny@v0.2.0", "--force"))
    assert "path" in line and repr(path) in line
    assert_untouched(victim)
    assert not worktree.exists()
    assert git(project, "branch", "--list") == branches
    assert snapshot(project) == before
    listed = {r["tag"]: r for r in json.loads(run(project, "list", "--json").stdout)}
    assert listed["tiny@v0.1.0"]["invalid"] is None
    assert repr(path) in listed["tiny@v0.2.0"]["invalid"]


def test_tag_path_inside_but_not_the_artifact_is_refused(project: Path) -> None:
    """A tag cannot aim `checkout --force` at another directory of the repository (src/)."""
    meta = real_meta(project)
    (project / "src").mkdir()
    (project / "src" / "code.py").write_text("print(1)")
    craft(project, "tiny@v0.2.0", {**meta, "path": "src"})
    line = one_error_line(run(project, "checkout", "tiny@v0.2.0", "--force"))
    assert "'src'" in line and "checkpoints" in line
    assert (project / "src" / "code.py").read_text() == "print(1)"


def test_workspace_symlink_on_the_artifact_path_is_refused(project: Path, victim: Path) -> None:
    real_meta(project)
    os.rename(project / "checkpoints", project.parent / "moved")
    os.symlink(victim, project / "checkpoints")
    line = one_error_line(run(project, "checkout", "tiny@v0.1.0", "--force"))
    assert "symlink" in line and "'checkpoints'" in line
    assert_untouched(victim)


def test_commit_symlink_on_the_artifact_path_is_refused_by_resume(
    project: Path, victim: Path, tmp_path: Path
) -> None:
    """A commit whose tree makes `checkpoints` a symlink out: resume would check it out and
    write through it; refused before the worktree or the branch exists."""
    meta = real_meta(project)
    env = {**os.environ, "GIT_INDEX_FILE": str(tmp_path / "index")}

    def g(*args: str, data: str | None = None) -> str:
        return subprocess.run(["git", *args], cwd=project, env=env, input=data, check=True,
                              capture_output=True, text=True).stdout.strip()

    g("read-tree", "HEAD")
    blob = g("hash-object", "-w", "--stdin", data=str(victim))
    g("update-index", "--add", "--cacheinfo", f"120000,{blob},checkpoints")
    commit = g("commit-tree", g("write-tree"), "-p", "HEAD", "-m", "symlink out")
    craft(project, "tiny@v0.2.0", meta, commit)
    worktree = tmp_path / "wt"
    line = one_error_line(run(project, "resume", "tiny@v0.2.0", "--worktree", str(worktree),
                              "--no-repro"))
    assert "symlink" in line and "checkpoints" in line
    assert not worktree.exists() and "resume" not in git(project, "branch", "--list")
    assert_untouched(victim)


@pytest.mark.parametrize("field,value", [
    ("checkpoint", "../../../../victim"),
    ("checkpoint", "0" * 32 + ".dir"),  # well-formed, but not what the commit pins
    ("step_dir", "../step-00000020"),
    ("step_dir", "step-00000020/../../x"),
    ("step", "notanint"),
    ("step", -1),
    ("step", True),
    ("metrics", {"loss": "low"}),
    ("metrics", [1, 2]),
    ("parent", {"x": 1}),
])
def test_bad_tag_field_is_listed_invalid_and_refused(
    project: Path, field: str, value: object
) -> None:
    meta = real_meta(project)
    craft(project, "tiny@v0.2.0", {**meta, field: value})
    res = run(project, "list")
    assert res.exit_code == 0, res.stderr
    rows = {r["tag"]: r for r in json.loads(run(project, "list", "--json").stdout)}
    assert rows["tiny@v0.1.0"]["invalid"] is None and rows["tiny@v0.1.0"]["step"] == 20
    assert "v0.1.0" in res.stdout
    assert ("invalid" in res.stdout) == (rows["tiny@v0.2.0"]["invalid"] is not None)
    for command in (["show", "tiny@v0.2.0"], ["checkout", "tiny@v0.2.0", "--force"],
                    ["verify", "tiny@v0.2.0"]):
        line = one_error_line(run(project, *command))
        assert field in line
    if rows["tiny@v0.2.0"]["invalid"] is not None:  # refused as it was read
        assert field in rows["tiny@v0.2.0"]["invalid"]


def test_metadata_nested_too_deep_or_not_json(project: Path) -> None:
    real_meta(project)
    craft(project, "tiny@v0.2.0", "[" * 150 + "]" * 150)
    craft(project, "tiny@v0.3.0", "first release")  # a user's line, not metadata
    rows = {r["tag"]: r for r in json.loads(run(project, "list", "--json").stdout)}
    assert "nesting" in rows["tiny@v0.2.0"]["invalid"]
    assert rows["tiny@v0.3.0"]["invalid"] is None
    assert "modelver: first release" in rows["tiny@v0.3.0"]["message"]
    # a tag made by another tool: what its commit pins
    assert api.resolve_ref(project, "tiny@v0.3.0").checkpoint_hash == rows["tiny@v0.1.0"][
        "checkpoint_hash"]


def test_stage_tag_with_bad_version_metadata_assigns_by_commit(project: Path) -> None:
    real_meta(project)
    craft(project, "tiny#prod#1", {"version": 5})
    assert api.list_versions(repo_root=project)[0].stages == ["prod"]


def test_tag_rich_markup_in_message_is_shown_as_text(project: Path) -> None:
    meta = real_meta(project)
    git(project, "tag", "-a", "tiny@v0.2.0", "-m",
        f"[red]boom[/red] [link=x]\n\n{v.META_PREFIX}{json.dumps(meta)}")
    res = run(project, "show", "tiny@v0.2.0")
    assert res.exit_code == 0 and "[red]boom[/red]" in res.stdout


def test_tag_message_with_git_listing_separators_lists_every_tag(project: Path) -> None:
    """A message holding the bytes `for-each-ref` output could be split on (found by the
    property test) neither breaks `list` nor hides the other versions."""
    meta = real_meta(project)
    git(project, "tag", "-a", "tiny@v0.2.0", "-m",
        f"\x1e\x1f\nsummary\n\n{v.META_PREFIX}{json.dumps(meta)}")
    res = run(project, "list", "--json")
    assert res.exit_code == 0, res.stderr
    assert {x["tag"] for x in json.loads(res.stdout)} == {"tiny@v0.1.0", "tiny@v0.2.0"}


# --- class 7: tag validates everything before creating the tag -----------------------------


def test_tag_of_checkpoint_with_string_metric_creates_no_tag(project: Path) -> None:
    step = project / "checkpoints" / "step-00000020"
    manifest = json.loads((step / "MANIFEST.json").read_text())
    manifest["metrics"]["phase"] = "warmup"
    (step / "MANIFEST.json").write_text(json.dumps(manifest))
    dvc(project, "commit", "-f", "-q")
    git(project, "commit", "-q", "-am", "string metric")
    line = one_error_line(run(project, "tag", "tiny@v0.1.0"))
    assert "metrics.phase" in line and "'warmup'" in line
    assert git(project, "tag", "-l") == ""


# --- class 9: every message names the command that was run ---------------------------------


def test_unpinned_commit_names_the_command(project: Path) -> None:
    git(project, "rm", "-q", "dvc.lock")
    git(project, "commit", "-qm", "drop lock")
    head = git(project, "rev-parse", "HEAD")
    craft(project, "tiny@v0.1.0", {"modelver": 1})  # another tool's tag: its commit pins
    for args, action in [
        (["show", "tiny@v0.1.0"], "cannot show"),
        (["checkout", head, "--to", str(project.parent / "out")], "cannot check out"),
        (["verify", head], "cannot verify"),
        (["diff", head, "tiny@v0.1.0"], "cannot diff"),
        (["tag", "tiny@v0.2.0"], "cannot tag"),
        (["resume", head, "--no-repro"], "cannot resume"),
    ]:
        line = one_error_line(run(project, *args))
        assert line.startswith(f"error: {action} tiny"), (args, line)
    with pytest.raises(NotPinnedError) as e:
        api.resolve_ref(project, head, action="cannot frob")
    assert e.value.action == "cannot frob"


# --- dvc.yaml, modelver.yaml, dvc.lock ------------------------------------------------------


@pytest.mark.parametrize("path", ["../victim", "/etc", "a/../../b", "."])
def test_artifact_paths_must_stay_inside(path: str) -> None:
    text = f"artifacts:\n  m:\n    path: {json.dumps(path)}\n"
    with pytest.raises(UnsafePathError, match=r"dvc\.yaml artifacts\.m\.path"):
        parse_artifacts(text)
    with pytest.raises(UnsafePathError, match=r"modelver\.yaml artifacts\.m\.path"):
        read_config(text)
    assert parse_artifacts("artifacts:\n  m:\n    path: ./ck/\n")["m"].path == "ck"


def test_modelver_yaml_that_is_not_yaml_is_one_error() -> None:
    with pytest.raises(MalformedDataError, match=r"modelver\.yaml"):
        read_config("a: [unclosed")
    with pytest.raises(ModelverError, match="unknown backend"):
        read_config("backend: [lfs]")


def test_committed_dvc_yaml_path_outside_is_refused(project: Path, victim: Path) -> None:
    text = (project / "dvc.yaml").read_text().replace("path: checkpoints", "path: ../victim")
    (project / "dvc.yaml").write_text(text)
    git(project, "commit", "-qam", "artifact outside")
    line = one_error_line(run(project, "checkout", "HEAD", "--force"))
    assert "dvc.yaml artifacts.tiny.path" in line and "'../victim'" in line
    assert_untouched(victim)


def test_dvc_lock_shapes_and_hashes() -> None:
    good = "stages:\n  t:\n    outs:\n    - path: ck\n      md5: " + "a" * 32 + ".dir\n"
    out = find_locked_out(good, "ck")
    assert out is not None and out.md5 == "a" * 32 + ".dir"
    assert find_locked_out("stages: [1, 2]", "ck") is None
    assert find_locked_out("stages:\n  t:\n    outs: 5\n", "ck") is None
    assert find_locked_out("stages:\n  t:\n    outs: [1, {path: 3}]\n", "ck") is None
    assert find_locked_out(good.replace("path: ck", "path: ../ck"), "ck") is None
    with pytest.raises(MalformedDataError, match="md5"):
        find_locked_out(good.replace("a" * 32 + ".dir", "../../../x"), "ck")
    with pytest.raises(MalformedDataError, match="size"):
        find_locked_out(good + "      size: big\n", "ck")
    with pytest.raises(UnsafePathError):
        find_locked_out(good, "../ck")


class _FakeStorage:
    root = Path("/nonexistent")

    def __init__(self, files: list[TreeFile]) -> None:
        self.files = files

    def tree(self, md5_dir: str) -> list[TreeFile]:
        return self.files


@pytest.mark.parametrize("relpath,md5", [
    ("../../outside/x", "a" * 32),
    ("/etc/passwd", "a" * 32),
    ("step-00000001/../../x", "a" * 32),
    ("step-00000001/MANIFEST.json", "../../x"),
])
def test_listing_paths_and_hashes_are_checked(relpath: str, md5: str) -> None:
    fake = _FakeStorage([TreeFile(relpath, md5, 1)])
    with pytest.raises((UnsafePathError, MalformedDataError)):
        tree(fake, "b" * 32 + ".dir", what="checkpoint")  # type: ignore[arg-type]
    with pytest.raises(MalformedDataError):
        tree(fake, "../x", what="checkpoint")  # type: ignore[arg-type]


# --- run records in the remote ---------------------------------------------------------------


@pytest.fixture
def pushed(tmp_path: Path) -> tuple[Path, RunRecord]:
    """A Git + DVC repository whose default remote holds one real run (step 7)."""
    root = init_repo(tmp_path)
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    mgr = CheckpointManager(root / "checkpoints", keep_last=None)
    mgr.save(7, {"model": model})
    mgr.close()
    path = root / "checkpoints" / "step-00000007"
    pub = Publisher(path.parent, True)
    pub.committed(path, read_manifest(path))
    pub.close()
    assert pub.published == [7]
    (rec,) = read_run_records(_store(root))[0]
    os.rename(root / "checkpoints", tmp_path / "gone")  # a fresh clone has none
    return root, rec


def _store(root: Path):  # type: ignore[no-untyped-def]
    repo = DvcStorage(root)
    try:
        return repo.remote_store()
    finally:
        repo.close()


def _forge(root: Path, run_id: str, rec: RunRecord, **changes: object) -> None:
    data = {**rec.to_json(), "run": run_id, **changes}
    _store(root).write_record(f"runs/{run_id}.json", json.dumps(data).encode())


@pytest.mark.parametrize("changes", [
    {"step": 999, "step_dir": "step-00000999", "path": "../../x"},  # the instance
    {"step": 999, "step_dir": "step-00000999"},  # the real objects, a false step
    {"path": "/tmp/abs-x"},
    {"step": 999, "step_dir": "step-00000999", "dir_md5": "../../../x"},
    {"step": 999, "step_dir": "step-00000999", "files": {"../x": "a" * 32}},
    {"step": 999, "step_dir": "../step-00000999"},
    {"step": "999", "step_dir": "step-00000999"},
    {"step": 999, "step_dir": "step-00000999", "dir_md5": "f" * 32 + ".dir"},  # not in remote
])
def test_forged_run_record_is_skipped_and_named_run_is_one_error(
    pushed: tuple[Path, RunRecord], tmp_path: Path, changes: dict[str, object]
) -> None:
    root, real = pushed
    _forge(root, "evil", real, **changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = api.recover(repo_root=root)
    assert any(issubclass(w.category, ModelverWarning) and "evil" in str(w.message)
               for w in caught)
    assert (res.run.run, res.run.step) == (real.run, 7)
    assert res.path == root / "checkpoints" / "step-00000007"
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000007"]
    os.rename(root / "checkpoints", tmp_path / "recovered")
    before = snapshot(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run(root, "recover", "--run", "evil")
    line = one_error_line(result, exit_code=1)
    assert "evil" in line and any(k in line for k in changes), line
    assert snapshot(root) == before
    assert not (tmp_path / "x").exists() and not Path("/tmp/abs-x").exists()


def test_all_records_forged_is_one_error(pushed: tuple[Path, RunRecord]) -> None:
    root, real = pushed
    _store(root).write_record(
        f"runs/{real.run}.json",
        json.dumps({**real.to_json(), "step": 999, "step_dir": "step-00000999"}).encode(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelverError, match="verifies"):
            api.recover(repo_root=root)
    assert not (root / "checkpoints").exists()


def test_record_fields_checked_one_by_one(pushed: tuple[Path, RunRecord]) -> None:
    _, real = pushed
    good = real.to_json()
    assert RunRecord.from_json(good) == real
    for key, bad in [("modelver_run", "1"), ("commit", "--upload-pack=x"), ("metrics", {"a": "b"}),
                     ("bases", [{"step_dir": "../x", "dir_md5": real.dir_md5, "files": {}}]),
                     ("bases", "nope"), ("run", 5), ("path", "")]:
        with pytest.raises((MalformedDataError, UnsafePathError)) as e:
            RunRecord.from_json({**good, key: bad})
        assert key in str(e.value) or "step_dir" in str(e.value)
    with pytest.raises(MalformedDataError):
        RunRecord.from_json([good])


def test_recover_list_says_checked_or_claimed(
    pushed: tuple[Path, RunRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record claiming step 999 over the real objects cannot list itself as the newest run:
    the listing reads the step from the manifest in the remote and marks the rest refused."""
    root, real = pushed
    _forge(root, "evil-step", real, step=999, step_dir="step-00000999")
    _forge(root, "evil-files", real, step=999, step_dir="step-00000999",
           files={**real.files, "extra.bin": "a" * 32})
    _forge(root, "evil-absent", real, step=998, step_dir="step-00000998",
           dir_md5="f" * 32 + ".dir")
    _forge(root, "evil-path", real, step=997, step_dir="step-00000997", path="../../x")
    _store(root).write_record("runs/garbage.json", b"{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(root, "recover", "--list", "--json")
        text = run(root, "recover", "--list")
    assert res.exit_code == 0 and text.exit_code == 0, (res.stderr, text.stderr)
    rows = json.loads(res.stdout)
    assert (rows[0]["run"], rows[0]["status"], rows[0]["step"]) == (real.run, "checked", 7)
    rest = {r["run"]: r for r in rows[1:]}
    assert set(rest) == {"evil-step", "evil-files", "evil-absent", "evil-path", "garbage"}
    assert all(r["status"] == "refused" and r["step"] is None and r["reason"]
               for r in rest.values())
    assert rest["evil-step"]["claimed_step"] == 999 and "999" in rest["evil-step"]["reason"]
    assert "../../x" in rest["evil-path"]["reason"]
    lines = text.stdout.splitlines()
    assert lines[0].startswith(real.run) and "step 7 (checked)" in lines[0]
    assert len(lines) == 6 and all("refused" in ln for ln in lines[1:])
    assert any("claimed step 999 (refused" in ln for ln in lines)
    # a manifest too large to read for a listing: claimed, never ranked over a checked one
    _forge(root, "big", real, step=999, step_dir="step-00000999")
    monkeypatch.setattr("modelver.api.recovery.MAX_LIST_MANIFEST", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        listed = api.list_runs(repo_root=root)
    assert {(r.run, r.status) for r in listed if r.record} >= {(real.run, "unchecked"),
                                                                ("big", "unchecked")}
    assert all(r.step is None for r in listed)


def test_recover_list_refuses_a_tampered_remote_object(pushed: tuple[Path, RunRecord]) -> None:
    root, real = pushed
    store = _store(root)
    mmd5 = real.files["MANIFEST.json"]
    path = Path(store.odb.oid_to_path(mmd5))
    os.chmod(path, 0o644)
    data = json.loads(path.read_bytes())
    path.write_text(json.dumps({**data, "step": 999}))  # same object id, other bytes
    (row,) = api.list_runs(repo_root=root)
    assert (row.status, row.step) == ("refused", None)
    assert row.reason and "md5" in row.reason
