"""Property (issue 11): a tag message is data anyone with push access wrote.

Messages are a summary line and a ``modelver:`` line whose JSON is a real tag's metadata with a
field replaced, deleted or added (hostile paths, huge ints, bools, strings where ints go, nested
objects, NaN, long strings, deep nesting), plus arbitrary text. The parsers accept or mark the
tag invalid, raising nothing but ModelverError, and what they accept is safe. Then the same kind
of tags are made for real in a Git + DVC repository and ``list``, ``show``, ``checkout --force``
and ``resume --worktree`` run on them: exit 0, 1 or 2, one error line at most, no traceback,
and a sentinel directory outside the repository untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modelver import api, untrusted
from modelver import versions as v
from modelver.cli.main import cli
from modelver.errors import ModelverError
from modelver.gitrepo import TagRecord
from tests.helpers import git

# the metadata `modelver tag` writes (the repository test replaces it with the real one)
BASE: dict[str, Any] = {
    "modelver": 1, "step": 20, "step_dir": "step-00000020", "metrics": {"loss": 0.25},
    "checkpoint": "0123456789abcdef0123456789abcdef.dir", "path": "checkpoints",
    "stage": "train", "parent": None,
}
FIELDS = [*BASE, "backend", "version", "files", "victim"]
DEEP = "__deep__"  # a placeholder replaced by a deeply nested JSON array in the text
VICTIM = "@victim@"  # replaced by the sentinel directory's absolute path

HOSTILE: list[Any] = [
    "../victim", "../../victim", "/tmp/victim", "/", "~/victim", ".", "", "..",
    "step-00000001/../..", "checkpoints/../../victim", "checkpoints/../..", "checkpoints/.",
    "step-00000001", "step-1", "step-00000020", "step-00000021", "v1.0.0", "v01.0.0",
    "a\\..\\victim", "checkpoints\x00/x", "[red]markup[/red]", "\ud800", "\n", "é" * 3,
    10**30, 2**63, -(2**63), -1, 0, 1, 20, 21, 1.5, -0.0, float("nan"), float("inf"),
    True, False, None, [], {}, ["checkpoints"], {"path": "../victim"},
    {"loss": "abc"}, {"loss": float("nan")}, {"loss": True}, {"loss": {"x": 1}},
    {"": 1.0}, {"../victim": 1.0}, {"a" * 300: 1.0}, "0" * 40, "f" * 32 + ".dir",
    "x" * 10_000, DEEP, VICTIM, VICTIM + "/keep.txt",
]
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                               max_size=3),
    max_leaves=10,
)
VALUES = st.sampled_from(HOSTILE) | JSONISH | st.integers(min_value=10**18, max_value=10**400)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=60)


@st.composite
def mutated(
    draw: st.DrawFn, base: dict[str, Any] | None = None, *, hostile: bool = False
) -> dict[str, Any]:
    """The real metadata with one to three fields replaced, deleted or added; ``hostile``:
    first one of its fields replaced by a hostile value (few examples must count)."""
    meta = dict(base or BASE)
    if hostile:
        meta[draw(st.sampled_from(sorted(meta)))] = draw(st.sampled_from(HOSTILE))
    for _ in range(draw(st.integers(0 if hostile else 1, 3))):
        key = draw(st.sampled_from(FIELDS) | st.text(max_size=10))
        if draw(st.booleans()) or key not in meta:
            meta[key] = draw(VALUES)
        else:
            del meta[key]
    return meta


@st.composite
def messages(
    draw: st.DrawFn, base: dict[str, Any] | None = None, *, hostile: bool = False
) -> str:
    """A summary line, maybe arbitrary text, and a `modelver:` line (mutated, or raw text)."""
    meta = draw(mutated(base, hostile=hostile))
    text = json.dumps(meta, sort_keys=draw(st.booleans()))
    depth = draw(st.sampled_from([2, 99, 101, 5000]))
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    line = draw(st.sampled_from([text, text, text[: len(text) // 2], "{not json", "[1, 2]"]))
    parts = [draw(TEXT) or "summary", "", f"{v.META_PREFIX}{line}"]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), draw(TEXT))
    if draw(st.booleans()):  # a second metadata line: the last valid one counts, or none
        parts.append(f"{v.META_PREFIX}{json.dumps(draw(mutated(base)))}")
    return "\n".join(parts)


def assert_safe(meta: dict[str, Any], root: Path) -> None:
    """What the parser accepted can be used as is: paths inside, ints ints, metrics floats."""
    assert set(meta) <= set(BASE) | {"backend", "version"}, meta
    if "path" in meta:
        full = os.path.realpath(root / meta["path"])
        assert os.path.commonpath([os.path.realpath(root), full]) == os.path.realpath(root)
        assert full != os.path.realpath(root)
        assert ".." not in Path(meta["path"]).parts and not Path(meta["path"]).is_absolute()
    for key in ("step", "modelver"):
        if key in meta:
            assert type(meta[key]) is int and meta[key] >= 0, meta
    if "step_dir" in meta:
        assert untrusted.STEP_DIR_RE.match(meta["step_dir"]), meta
        assert int(meta["step_dir"][5:]) == meta["step"]
    for name, x in meta.get("metrics", {}).items():
        assert isinstance(name, str) and type(x) is float, meta
    if "checkpoint" in meta:
        assert v.HASH_RE.match(meta["checkpoint"]), meta
    for key in ("parent", "version"):
        if key in meta:
            v.Semver.parse(meta[key])


# --- the parsers ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(message=messages(), meta=mutated())
def test_parsers_accept_or_mark_invalid(message: str, meta: dict[str, Any]) -> None:
    root = Path(tempfile.gettempdir()) / "modelver-root"
    records = [
        TagRecord("tiny@v1.0.0", True, "c" * 40, "2024-01-01T00:00:00", message),
        TagRecord("tiny#prod#1", True, "c" * 40, "2024-01-01T00:00:00", message),
        TagRecord("tiny@v1.0.1", True, "d" * 40, "2024-01-01T00:00:00", "plain text"),
    ]
    reg = v.build_registry(records, root=root)  # never raises: a bad tag is listed invalid
    assert [x.tag for x in reg.versions] == ["tiny@v1.0.0", "tiny@v1.0.1"]
    ver = reg.versions[0]
    if ver.invalid is None:
        ver.check()
        assert_safe(ver.meta, root)
        assert ver.step is None or ver.step >= 0
        assert all(isinstance(x, float) for x in ver.metrics.values())
    else:
        assert ver.meta == {} and ver.step is None and ver.metrics == {}
        with pytest.raises(ModelverError):
            ver.check()
    try:
        checked = v.parse_meta(meta, tag="tiny@v1.0.0", root=root)
    except ModelverError as e:
        assert e.message and len(e.message) < 2000
    else:
        assert_safe(checked, root)
    with contextlib.suppress(ModelverError):
        v.parse_message(message)


def test_metrics_keep_nan_as_float_and_refuse_the_rest() -> None:
    meta = v.parse_meta({"metrics": {"loss": float("nan"), "acc": 1}}, tag="t@v1.0.0")
    assert math.isnan(meta["metrics"]["loss"]) and type(meta["metrics"]["acc"]) is float
    for bad in ("abc", True, None, [1], {"x": 1}):
        with pytest.raises(ModelverError):
            v.parse_meta({"metrics": {"loss": bad}}, tag="t@v1.0.0")


# --- the commands, on a real repository -------------------------------------------------------


@pytest.fixture(scope="module")
def repo(template_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Git + DVC project (tagged tiny@v0.1.0 for real) for the whole module, with a
    sentinel ``victim/keep.txt`` beside it that no command may touch."""
    base = tmp_path_factory.mktemp("prop-tags")
    home = base / "home"
    home.mkdir()
    root = base / "proj"
    shutil.copytree(template_project, root, symlinks=True)
    (root / ".dvc" / "config.local").unlink()
    shutil.rmtree(root / ".dvc" / "tmp", ignore_errors=True)
    (base / "victim").mkdir()
    (base / "victim" / "keep.txt").write_text("precious")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the per-test HOME is not set yet
        mp.setenv("HOME", str(home))
        mp.setenv("XDG_CACHE_HOME", str(home / ".cache"))
        mp.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")
        api.init(root, remote=str(base / "remote"))
        api.tag("tiny@v0.1.0", repo_root=root)
    yield root


def _real_meta(root: Path) -> dict[str, Any]:
    msg = git(root, "tag", "-l", "--format=%(contents)", "tiny@v0.1.0")
    return dict(json.loads(msg.split(v.META_PREFIX)[1]))


def _outside(root: Path) -> dict[str, bytes | None]:
    """Everything beside the repository (worktrees apart): name -> content (None: a dir)."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, files in os.walk(root.parent):
        rel = os.path.relpath(dirpath, root.parent)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in (root.name, "home", "remote")
                           and not d.startswith("wt-")]
        for d in dirnames:
            found[os.path.join(rel, d)] = None
        for f in files:
            found[os.path.join(rel, f)] = Path(dirpath, f).read_bytes()
    return found


def _cli(root: Path, *args: str) -> tuple[int, str, str]:
    old = Path.cwd()
    os.chdir(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    finally:
        os.chdir(old)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # anything but a clean exit is a bug: show its traceback
    return res.exit_code, res.stdout, res.stderr


def _check(root: Path, args: tuple[str, ...], code: int, out: str, err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code in (0, 1, 2), (args, code, err)
    assert len(lines) <= 1 and "Traceback" not in err + out, (args, err)
    if code:
        assert lines and lines[0].startswith(("error:", "Usage:", "Error:")), (args, err)


_N = iter(range(10**6))


def _with(**changes: Any) -> dict[str, Any]:
    return {"meta": changes}


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
@example(data=_with(path="../victim"))  # the instances, then 15 generated: 20 in all
@example(data=_with(path=VICTIM))
@example(data=_with(path="checkpoints/../../victim", step_dir="step-00000001/../.."))
@example(data=_with(step="notanint"))
@example(data=_with(path="train.py"))  # inside, but not the artifact's path
def test_commands_on_crafted_tags_stay_inside(repo: Path, data: Any) -> None:
    base = _real_meta(repo)
    if isinstance(data, dict):
        message = f"crafted\n\n{v.META_PREFIX}{json.dumps({**base, **data['meta']})}"
    else:
        message = data.draw(messages(base, hostile=True))
    message = message.replace(VICTIM, str(repo.parent / "victim"))
    n = next(_N)
    tag = f"tiny@v9.0.{n}"
    worktree = repo.parent / f"wt-{n}"
    before = _outside(repo)
    msg_file = repo.parent / "home" / "msg.txt"
    msg_file.write_text(message, encoding="utf-8")
    git(repo, "tag", "-a", "--cleanup=verbatim", "-F", str(msg_file), tag, "HEAD")
    try:
        code, out, err = _cli(repo, "list", "--json")
        _check(repo, ("list",), code, out, err)
        assert code == 0 and tag in {r["tag"] for r in json.loads(out)}
        for args in (("show", tag), ("checkout", tag, "--force"),
                     ("resume", tag, "--worktree", str(worktree), "--no-repro", "-q")):
            code, out, err = _cli(repo, *args)
            _check(repo, args, code, out, err)
            assert _outside(repo) == before, args
            assert (repo.parent / "victim" / "keep.txt").read_text() == "precious"
    finally:
        git(repo, "tag", "-d", tag)
        if worktree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=repo,
                           capture_output=True, check=False)
            shutil.rmtree(worktree, ignore_errors=True)
        git(repo, "worktree", "prune")
        for b in git(repo, "branch", "--list", "modelver/resume/*",
                     "--format=%(refname:short)").split():
            git(repo, "branch", "-D", b)
