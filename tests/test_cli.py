"""The registry and data commands through click's runner and the installed script."""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelver import api
from tests.helpers import (
    dvc,
    git,
    make_project,
    model_hashes,
    one_error_line,
    run,
    same_tree,
    set_params,
    train_and_commit,
)

COMMANDS = ["init", "tag", "promote", "list", "show", "checkout", "push", "pull", "verify",
            "resume"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_everywhere(command: str, tmp_path: Path) -> None:
    res = run(tmp_path, command, "--help")
    assert res.exit_code == 0 and "Usage:" in res.stdout


def test_init_outside_git_changes_nothing(tmp_path: Path) -> None:
    res = run(tmp_path, "init")
    assert res.exit_code == 1 and "not inside a Git repository" in one_error_line(res)
    assert list(tmp_path.iterdir()) == []


def test_init_dvc_remote_and_link_type(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    res = run(tmp_path, "init")
    assert res.exit_code == 0, res.stderr
    config = (tmp_path / ".dvc" / "config").read_text()
    assert "reflink,hardlink,copy" in config
    local = (tmp_path / ".dvc" / "config.local").read_text()
    remote = api.default_remote_dir(tmp_path)
    assert str(remote) in local and remote.is_dir()
    assert not remote.is_relative_to(tmp_path)
    again = run(tmp_path, "init", "-q")
    assert again.exit_code == 0 and again.stdout == ""
    assert (tmp_path / ".dvc" / "config.local").read_text() == local
    res = run(tmp_path, "init", "--remote", "s3://bucket/models")
    assert "s3://bucket/models" in (tmp_path / ".dvc" / "config").read_text()
    remotes = dvc(tmp_path, "remote", "list").stdout
    assert "s3://bucket/models" in remotes and str(remote) not in remotes


def test_tag_list_show_json(project: Path) -> None:
    res = run(project, "tag", "tiny@v0.1.0", "-m", "first")
    assert res.exit_code == 0 and "tiny@v0.1.0" in res.stdout
    assert run(project, "promote", "tiny@v0.1.0", "prod").exit_code == 0
    rows = json.loads(run(project, "list", "--json").stdout)
    assert len(rows) == 1
    row = rows[0]
    assert {"name", "version", "tag", "commit", "step", "metrics", "stages"} <= row.keys()
    assert (row["name"], row["version"], row["step"], row["stages"]) == (
        "tiny", "v0.1.0", 20, ["prod"])
    assert row["message"] == "first"
    shown = json.loads(run(project, "show", "tiny#prod", "--json").stdout)
    assert shown["params"] == {"params.yaml": {"train": {
        "seed": 0, "steps": 20, "every": 10, "lr": 0.05}}}
    assert {f["path"] for f in shown["files"]} >= {"MANIFEST.json", "state.json"}
    step_dir = project / "checkpoints" / "step-00000020"
    assert all(f["size"] == (step_dir / f["path"]).stat().st_size for f in shown["files"])
    assert shown["in_cache"] is True and shown["in_remote"] is False
    assert run(project, "push", "-q").exit_code == 0
    assert json.loads(run(project, "show", "tiny", "--json").stdout)["in_remote"] is True
    table = run(project, "list")
    assert "tiny" in table.stdout and "prod" in table.stdout and "loss=" in table.stdout


def test_errors_are_one_line_and_change_nothing(project: Path) -> None:
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    tags = git(project, "tag", "-l")
    res = run(project, "tag", "tiny@1.0")
    assert res.exit_code == 2 and "invalid version" in one_error_line(res)
    res = run(project, "tag", "tiny@v0.1.0")
    assert res.exit_code == 1 and "exists" in one_error_line(res)
    res = run(project, "show", "nope@v1.0.0")
    assert res.exit_code == 1 and "unknown reference" in one_error_line(res)
    res = run(project, "tag", "tiny@v0.2.0", "--bump", "minor")
    assert res.exit_code == 2
    res = run(project, "resume", "tiny", "-S", "novalue")
    assert res.exit_code == 2 and "invalid override" in res.stderr
    assert git(project, "tag", "-l") == tags
    assert git(project, "branch", "--list", "modelver/*") == ""


def test_checkout_workspace_and_to(project: Path) -> None:
    run(project, "tag", "tiny@v0.1.0", "-q")
    v1 = model_hashes(project / "checkpoints" / "step-00000020")
    set_params(project, steps=30)
    train_and_commit(project, "train to 30")
    run(project, "tag", "tiny@v0.2.0", "-q")
    params = (project / "params.yaml").read_text()
    res = run(project, "checkout", "tiny@v0.1.0", "-q")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (project / "checkpoints").iterdir()) == [
        "step-00000010", "step-00000020"]
    assert model_hashes(project / "checkpoints" / "step-00000020") == v1
    assert (project / "params.yaml").read_text() == params  # code and params untouched
    out = project.parent / "exported"
    res = run(project, "checkout", "tiny@v0.2.0", "--to", str(out))
    assert res.exit_code == 0 and "step 30" in res.stdout
    assert [p.name for p in out.iterdir()] == ["step-00000030"]
    # unsaved checkpoints in the workspace are not thrown away without --force
    extra = project / "checkpoints" / "step-00000099"
    extra.mkdir()
    (extra / "MANIFEST.json").write_text('{"not": "in the cache"}')
    res = run(project, "checkout", "tiny@v0.2.0")
    assert res.exit_code == 1 and "not in the DVC cache" in one_error_line(res)
    assert extra.is_dir()
    assert run(project, "checkout", "tiny@v0.2.0", "--force", "-q").exit_code == 0
    assert not extra.exists()


def test_verify_exit_codes(project: Path) -> None:
    run(project, "tag", "tiny@v0.1.0", "-q")
    assert run(project, "verify").exit_code == 0
    res = run(project, "verify", "tiny@v0.1.0", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True
    f = project / "checkpoints" / "step-00000020" / "state.json"
    f.write_text(f.read_text().replace("1", "2", 1))
    res = run(project, "verify", "checkpoints")
    assert res.exit_code == 1 and "CORRUPT" in res.stdout and "step-00000020" in res.stdout
    res = run(project, "verify", str(project / "checkpoints" / "step-00000010"))
    assert res.exit_code == 0
    assert run(project, "verify", "tiny@v0.1.0").exit_code == 0  # the cached copy is intact


def test_push_pull_through_git_origin(project: Path, tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    git(project, "remote", "add", "origin", str(origin))
    git(project, "push", "-q", "origin", "main")
    run(project, "tag", "tiny@v0.1.0", "-q")
    run(project, "promote", "tiny@v0.1.0", "prod", "-q")
    res = run(project, "push", "--json")
    assert res.exit_code == 0, res.stderr
    pushed = json.loads(res.stdout)
    assert pushed["objects"] > 0 and set(pushed["tags"]) == {"tiny@v0.1.0", "tiny#prod#1"}
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--no-tags", str(origin), str(clone))
    assert git(clone, "tag", "-l") == ""
    shutil.copy(project / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    res = run(clone, "pull", "tiny#prod", "--json")
    assert res.exit_code == 0, res.stderr
    assert "tiny@v0.1.0" in json.loads(res.stdout)["tags"]
    assert run(clone, "checkout", "tiny@v0.1.0", "-q").exit_code == 0
    assert same_tree(clone / "checkpoints", project / "checkpoints")


def test_push_to_unreachable_remote(project: Path) -> None:
    run(project, "tag", "tiny@v0.1.0", "-q")
    dvc(project, "remote", "add", "--local", "-f", "-d", "broken", "/proc/nonexistent/remote")
    res = run(project, "push")
    assert res.exit_code == 1 and "remote 'broken'" in one_error_line(res)


def test_data_in_neither_cache_nor_remote(project: Path) -> None:
    run(project, "tag", "tiny@v0.1.0", "-q")
    shutil.rmtree(project / ".dvc" / "cache")
    res = run(project, "checkout", "tiny@v0.1.0", "--to", str(project.parent / "x"))
    assert res.exit_code == 1 and "neither the local cache nor the remote" in one_error_line(res)
    assert not (project.parent / "x").exists()


def test_gto_show_lists_modelver_versions(project: Path) -> None:
    run(project, "tag", "tiny@v0.1.0", "-q")
    set_params(project, steps=30)
    train_and_commit(project, "train to 30")
    run(project, "tag", "tiny", "--bump", "minor", "-q")
    run(project, "promote", "tiny@v0.1.0", "prod", "-q")
    gto = str(Path(sys.executable).with_name("gto"))

    def gto_json(*args: str) -> object:
        return json.loads(subprocess.run([gto, *args], cwd=project, check=True,
                                         capture_output=True, text=True).stdout)

    rows = gto_json("show", "tiny", "--json")
    assert isinstance(rows, list)
    assert {r["version"] for r in rows} == {"v0.1.0", "v0.2.0"}
    summary = gto_json("show", "--json")
    assert summary == {"tiny": {"version": "v0.2.0", "stage": {"prod": "v0.1.0"},
                                "registered": True, "active": True}}


def test_dvc_artifacts_get_fetches_a_version(project: Path, tmp_path: Path) -> None:
    remote = tmp_path / "shared-remote"
    remote.mkdir()
    api.init(project, remote=str(remote))  # a committed remote, visible to a clone
    git(project, "add", ".dvc/config")
    git(project, "commit", "-qm", "shared remote")
    run(project, "tag", "tiny@v0.1.0", "-q")
    assert run(project, "push", "-q").exit_code == 0
    expected = project.parent / "expected"
    shutil.copytree(project / "checkpoints", expected)
    shutil.rmtree(project / ".dvc" / "cache")
    dvc(tmp_path, "artifacts", "get", str(project), "tiny", "--rev", "v0.1.0", "-o", "got")
    assert same_tree(tmp_path / "got", expected)


def test_resume_in_place_prepares_branch(project: Path) -> None:
    run(project, "tag", "tiny@v0.1.0", "-q")
    set_params(project, steps=30)
    train_and_commit(project, "train to 30")
    (project / "notes.txt").write_text("uncommitted")
    git(project, "add", "notes.txt")
    res = run(project, "resume", "tiny@v0.1.0", "--no-repro")
    assert res.exit_code == 1 and "uncommitted" in one_error_line(res)
    git(project, "reset", "-q", "--hard")
    res = run(project, "resume", "tiny@v0.1.0", "-S", "train.steps=40", "-S", "train.lr=0.01",
              "--no-repro")
    assert res.exit_code == 0, res.stderr
    assert git(project, "branch", "--show-current") == "modelver/resume/tiny-v0.1.0"
    assert sorted(p.name for p in (project / "checkpoints").iterdir())[-1] == "step-00000020"
    params = (project / "params.yaml").read_text()
    assert "steps: 40  # total" in params and "lr: 0.01" in params
    git(project, "checkout", "-q", "-f", "main")
    res = run(project, "resume", "tiny@v0.1.0", "--no-repro", "-q")
    assert git(project, "branch", "--show-current") == "modelver/resume/tiny-v0.1.0-2"


@pytest.mark.slow
def test_resume_continues_bit_identical(project: Path, tmp_path: Path) -> None:
    run(project, "tag", "tiny@v0.1.0", "-q")
    wt = tmp_path / "resumed"
    res = run(project, "resume", "tiny@v0.1.0", "-S", "train.steps=40", "--worktree", str(wt),
              "-q")
    assert res.exit_code == 0, res.stderr
    assert git(project, "branch", "--show-current") == "main"  # the user's tree is untouched
    resumed = wt / "checkpoints" / "step-00000040"
    straight = make_project(tmp_path / "straight", steps=40) / "checkpoints" / "step-00000040"
    assert model_hashes(resumed) == model_hashes(straight)
    assert api.verify("tiny@v0.1.0", repo_root=project).ok  # training did not touch the cache


def test_list_on_an_80_column_terminal_keeps_each_date_on_one_line(gated: Path) -> None:
    import os
    import pty
    import re

    exe = shutil.which("modelver") or str(Path(sys.executable).with_name("modelver"))
    project = gated  # tiny@v0.1.0 in production, with metrics: as wide as a real row
    subprocess.run([exe, "promote", "tiny@v0.1.0", "staging", "-q"], cwd=project, check=True)
    leader, follower = pty.openpty()  # a terminal: rich lays the table out to its width
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    proc = subprocess.run([exe, "list"], cwd=project, stdout=follower, stderr=subprocess.PIPE,
                          env=env, timeout=120)
    os.close(follower)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the output is drained
        while data := os.read(leader, 65536):
            chunks.append(data)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())  # no styles
    lines = text.splitlines()
    assert proc.returncode == 0 and max(len(line) for line in lines) <= 80
    row = next(line for line in lines if "v0.1.0" in line)
    assert re.search(r"\b[0-9a-f]{10}\b", row), lines  # the commit, whole
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row), lines


def test_installed_script(project: Path) -> None:
    exe = shutil.which("modelver") or str(Path(sys.executable).with_name("modelver"))
    subprocess.run([exe, "tag", "tiny@v0.1.0", "-q"], cwd=project, check=True)
    out = subprocess.run([exe, "list", "--json"], cwd=project, check=True,
                         capture_output=True, text=True)
    assert json.loads(out.stdout)[0]["tag"] == "tiny@v0.1.0"
    bad = subprocess.run([exe, "show", "tiny@v9.0.0"], cwd=project, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: unknown reference")


@pytest.mark.parametrize("command", ["history", "report"])
def test_a_command_imports_only_what_it_needs(command: str) -> None:
    trace = subprocess.run([sys.executable, "-X", "importtime", "-m", "modelver.cli.main",
                            command, "--help"], capture_output=True, text=True, check=True)
    loaded = {line.rpartition("|")[2].strip() for line in trace.stderr.splitlines()}
    assert "Usage: modelver" in trace.stdout
    assert not loaded & {"torch", "git", "dvc", "numpy", "modelver.api.data"}, loaded


def test_every_command_is_mapped_to_its_module() -> None:
    from modelver.cli.main import COMMAND_MODULES

    for mod_name in set(COMMAND_MODULES.values()):
        names = {c.name for c in importlib.import_module(mod_name).COMMANDS}
        assert names == {k for k, v in COMMAND_MODULES.items() if v == mod_name}, mod_name
