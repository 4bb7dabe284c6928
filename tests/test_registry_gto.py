"""GTO parity: deprecate, unassign and history written and read as GTO 1.10 does, checked
against the real ``gto`` CLI both ways (modelver writes, gto reads; gto writes, modelver reads)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from modelver import api
from modelver import versions as v
from modelver.gitrepo import TagRecord
from tests.helpers import git, one_error_line, run

GTO = str(Path(sys.executable).with_name("gto"))
T0 = int(time.time()) + 86_400  # tags dated ahead of the commits: GTO also counts commit times


def gto(project: Path, *args: str) -> Any:
    out = subprocess.run([GTO, *args], cwd=project, check=True, capture_output=True, text=True)
    return json.loads(out.stdout) if "--json" in args else out.stdout


def at(monkeypatch: pytest.MonkeyPatch, minute: int) -> None:
    """The next tag's tagger time: GTO orders events by it, in whole seconds."""
    monkeypatch.setenv("GIT_COMMITTER_DATE", f"@{T0 + 60 * minute} +0000")


def ok(project: Path, *args: str) -> str:
    res = run(project, *args)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res.stdout


def three_versions(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny v0.1.0, v0.2.0, v0.3.0 on three commits (the same checkpoint)."""
    for minute, version in enumerate(("v0.1.0", "v0.2.0", "v0.3.0")):
        at(monkeypatch, minute)
        if minute:
            git(project, "commit", "-q", "--allow-empty", "-m", f"release {version}")
        ok(project, "tag", f"tiny@{version}", "-q")


def gto_history(project: Path) -> list[tuple[str, str | None, str | None, str, str, str]]:
    return [(e["event"], e["version"], e["stage"], e["ref"], e["commit"], e["timestamp"])
            for e in gto(project, "history", "tiny", "--json", "--ascending")]


def our_history(project: Path) -> list[tuple[str, str | None, str | None, str, str, str]]:
    out = json.loads(ok(project, "history", "tiny", "--json"))
    return [(e["gto_event"], e["version"], e["stage"], e["tag"], e["commit"],
             e["created"].replace("Z", "+00:00")) for e in out]


def live(project: Path, *extra: str) -> dict[str, tuple[list[str], str | None]]:
    rows = json.loads(ok(project, "list", "--json", *extra))
    return {r["version"]: (r["stages"], r["deprecated"]) for r in rows}


# --- modelver writes, gto reads -------------------------------------------------------------


def test_deprecate_unassign_history_read_back_by_gto(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_versions(project, monkeypatch)
    for minute, (ref, stage) in enumerate(
        [("tiny@v0.1.0", "prod"), ("tiny@v0.2.0", "prod"), ("tiny@v0.2.0", "dev")], start=10
    ):
        at(monkeypatch, minute)
        ok(project, "promote", ref, stage, "-q")
    at(monkeypatch, 20)
    out = ok(project, "unassign", "tiny", "prod")  # v0.2.0 leaves: v0.1.0's assignment holds
    assert "tiny#prod!#4" in out and "now tiny@v0.1.0" in out
    assert gto(project, "show", "--json")["tiny"]["stage"] == {"prod": "v0.1.0", "dev": "v0.2.0"}
    assert live(project)["v0.1.0"][0] == ["prod"]

    at(monkeypatch, 21)
    assert "created tiny@v0.1.0!:" in ok(project, "deprecate", "tiny@v0.1.0")
    shown = gto(project, "show", "--json")["tiny"]
    assert shown == {"version": "v0.3.0", "stage": {"dev": "v0.2.0"},  # prod: held by none
                     "registered": True, "active": True}
    assert {r["version"] for r in gto(project, "show", "tiny", "--json")} == {"v0.2.0", "v0.3.0"}
    assert live(project) == {"v0.2.0": (["dev"], None), "v0.3.0": ([], None)}
    assert live(project, "--deprecated")["v0.1.0"] == ([], "tiny@v0.1.0!")
    assert "no version of tiny is in stage 'prod'" in one_error_line(
        run(project, "show", "tiny#prod"), exit_code=1)
    shown_text = ok(project, "show", "tiny@v0.1.0")
    assert "deprecated  yes, by tiny@v0.1.0!" in shown_text
    assert json.loads(ok(project, "show", "tiny@v0.1.0", "--json"))["deprecated"] == "tiny@v0.1.0!"

    at(monkeypatch, 22)
    assert "created tiny@deprecated:" in ok(project, "deprecate", "tiny")
    assert gto(project, "show", "--json") == {}
    assert gto(project, "show", "--json", "--deprecated")["tiny"]["active"] is False
    assert live(project) == {}
    assert "--deprecated" in ok(project, "list")  # the hint for hidden versions
    assert set(live(project, "--deprecated")) == {"v0.1.0", "v0.2.0", "v0.3.0"}

    at(monkeypatch, 23)  # a new version revives the artifact (GTO: its newest event decides)
    git(project, "commit", "-q", "--allow-empty", "-m", "release v0.4.0")
    ok(project, "tag", "tiny@v0.4.0", "-q")
    assert gto(project, "show", "--json")["tiny"]["active"] is True
    assert set(live(project)) == {"v0.2.0", "v0.3.0", "v0.4.0"}
    at(monkeypatch, 24)
    assert "created tiny@deprecated#5:" in ok(project, "deprecate", "tiny")  # GTO's --force form
    assert gto(project, "show", "--json") == {}

    ours = our_history(project)
    assert ours == gto_history(project)
    assert [e[0] for e in ours] == ["registration"] * 3 + ["assignment"] * 3 + [
        "unassignment", "deregistration", "deprecation", "registration", "deprecation"]
    events = api.history("tiny", repo_root=project)
    assert [e.kind for e in events][-5:] == [
        "unassignment", "deprecation", "deprecation", "registration", "deprecation"]
    assert events[7].version == "v0.1.0" and events[8].version is None
    assert (events[0].author, events[0].author_email) == ("modelver tests",
                                                          "tests@modelver.invalid")
    assert events[0].created == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0))


def test_same_second_writes_still_mean_what_they_say(project: Path) -> None:
    """GTO's clock has whole seconds and breaks a tie against an assignment or a deprecation:
    modelver writes those in the second after the artifact's last event."""
    ok(project, "tag", "tiny@v0.1.0", "-q")
    ok(project, "promote", "tiny@v0.1.0", "prod", "-q")
    ok(project, "unassign", "tiny", "prod", "-q")
    ok(project, "promote", "tiny@v0.1.0", "prod", "-q")
    assert live(project)["v0.1.0"][0] == ["prod"]
    assert gto(project, "show", "--json")["tiny"]["stage"] == {"prod": "v0.1.0"}
    ok(project, "deprecate", "tiny", "-q")
    assert gto(project, "show", "--json") == {} and live(project) == {}


# --- gto writes, modelver reads -------------------------------------------------------------


def next_second() -> None:
    """Gto cannot be given a tagger date, and orders the events of one second its own way."""
    time.sleep(1.05 - time.time() % 1)


def gto_write(project: Path, *args: str) -> None:
    next_second()
    gto(project, *args)


def test_gto_deprecate_and_unassign_read_by_modelver(project: Path) -> None:
    ok(project, "tag", "tiny@v0.1.0", "-q")
    git(project, "commit", "-q", "--allow-empty", "-m", "release v0.2.0")
    next_second()
    ok(project, "tag", "tiny@v0.2.0", "-q")
    gto_write(project, "assign", "tiny", "--version", "v0.1.0", "--stage", "prod")
    gto_write(project, "assign", "tiny", "--version", "v0.2.0", "--stage", "prod")
    gto_write(project, "assign", "tiny", "--version", "v0.2.0", "--stage", "dev")
    assert live(project) == {"v0.1.0": ([], None), "v0.2.0": (["dev", "prod"], None)}
    gto_write(project, "deprecate", "tiny", "v0.2.0", "prod")  # unassign
    assert live(project)["v0.1.0"] == (["prod"], None)
    assert api.resolve_ref(project, "tiny#prod").version == "v0.1.0"
    gto_write(project, "deprecate", "tiny", "v0.2.0")  # deregister
    assert live(project) == {"v0.1.0": (["prod"], None)}
    assert live(project, "--deprecated")["v0.2.0"] == ([], "tiny@v0.2.0!")
    assert our_history(project) == gto_history(project)
    gto_write(project, "deprecate", "tiny")
    assert live(project) == {} and gto(project, "show", "--json") == {}
    assert our_history(project) == gto_history(project)
    assert one_error_line(run(project, "deprecate", "tiny"), exit_code=1).startswith(
        "error: artifact tiny is deprecated already (by tiny@deprecated)")


# --- refusals: one error line, no tag --------------------------------------------------------


def test_refusals_change_nothing(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at(monkeypatch, 0)
    ok(project, "tag", "tiny@v0.1.0", "-q")
    at(monkeypatch, 1)
    ok(project, "promote", "tiny@v0.1.0", "prod", "-q")
    at(monkeypatch, 2)
    git(project, "commit", "-q", "--allow-empty", "-m", "release v0.2.0")
    ok(project, "tag", "tiny@v0.2.0", "-q")
    at(monkeypatch, 3)
    ok(project, "deprecate", "tiny@v0.2.0", "-q")
    before = git(project, "tag", "-l")
    cases: list[tuple[tuple[str, ...], int, str]] = [
        (("deprecate", "tiny@v9.9.9"), 1, "unknown reference 'tiny@v9.9.9'"),
        (("deprecate", "nope"), 1, "'nope' is not an artifact"),
        (("deprecate", "tiny@v0.2.0"), 1, "tiny@v0.2.0 is deprecated already"),
        (("deprecate", "tiny@v1"), 2, "invalid version 'tiny@v1'"),
        (("deprecate", "tiny@v0.1.0!"), 2, "invalid version"),
        (("deprecate", "../tiny"), 2, "not a valid artifact name"),
        (("deprecate", "tiny@deprecated"), 2, "invalid version"),
        (("unassign", "tiny", "dev"), 1, "no version of tiny is in stage 'dev'"),
        (("unassign", "tiny@v0.1.0", "staging"), 1, "does not hold stage 'staging'"),
        (("unassign", "tiny@v0.2.0", "prod"), 1, "tiny@v0.2.0 does not hold stage 'prod'"),
        (("unassign", "tiny", "prod#1"), 2, "not a valid stage name"),
        (("unassign", "tiny", "prod!"), 2, "not a valid stage name"),
        (("unassign", "tiny#prod", "prod"), 2, "not a valid artifact name"),
        (("unassign", "nope", "prod"), 1, "'nope' is not an artifact"),
        (("promote", "tiny@v0.2.0", "prod"), 1, "cannot promote tiny@v0.2.0: deprecated by"),
        (("history", "nope"), 1, "'nope' is not an artifact"),
        (("history", "a b"), 2, "not a valid artifact name"),
    ]
    for args, code, text in cases:
        assert text in one_error_line(run(project, *args), exit_code=code), args
    assert git(project, "tag", "-l") == before


# --- the state machine, on tag records ------------------------------------------------------


def rec(name: str, commit: str, second: int, message: str = "x") -> TagRecord:
    return TagRecord(name, True, commit, f"2026-01-01T00:00:{second:02d}+00:00", message)


def test_ties_in_one_second_follow_gto() -> None:
    reg = v.build_registry([
        rec("m@v1.0.0", "c1", 0), rec("m@v2.0.0", "c2", 0), rec("m@v2.0.0!", "c2", 0),
        rec("m#prod#1", "c1", 1), rec("m#prod!#2", "c1", 1),  # same second: unassigned
        rec("m#dev#3", "c1", 2),
        rec("n@v1.0.0", "c3", 5), rec("n@deprecated", "c3", 5),  # a tie revives: n is live
        rec("o@v1.0.0", "c4", 5), rec("o@deprecated", "c4", 6),
        rec("p@v1.0.0", "c5", 1), rec("p#prod#1", "c5", 2), rec("p@deprecated", "c5", 3),
        rec("p#prod!#2", "c5", 4),  # any newer event revives the artifact too
    ])
    assert [str(x.version) for x in reg.of("m")] == ["v1.0.0"]
    assert reg.get("m", v.Semver(2, 0, 0)).deprecated == "m@v2.0.0!"  # type: ignore[union-attr]
    assert reg.in_stage("m", "prod") is None and reg.in_stage("m", "dev") is not None
    assert reg.of("n") and not reg.of("o")
    assert reg.deprecated_artifacts == {"o": "o@deprecated"}
    assert reg.of("p") and reg.in_stage("p", "prod") is None
    assert reg.stage_counters == {"m": 3, "p": 2}
    kinds = [(e.tag, e.kind) for e in reg.events if e.name == "n"]
    assert kinds == [("n@deprecated", "deprecation"), ("n@v1.0.0", "registration")]


def test_stage_falls_back_and_deregistered_versions_hold_no_stage() -> None:
    reg = v.build_registry([
        rec("m@v1.0.0", "c1", 0), rec("m@v2.0.0", "c2", 0), rec("m@v3.0.0", "c3", 0),
        rec("m#prod#1", "c1", 1), rec("m#prod#2", "c2", 2), rec("m#prod#3", "c3", 3),
        rec("m@v3.0.0!", "c3", 4), rec("m#prod!#4", "c2", 5),
        rec("m#prod", "c9", 6),  # GTO's simple form, at a commit with no version: ignored
        rec("m@v1.0.0-rc1#7", "c1", 7),  # a pre-release modelver does not read: its counter
    ])
    prod = reg.in_stage("m", "prod")
    assert prod is not None and str(prod.version) == "v1.0.0"
    assert reg.get("m", v.Semver(3, 0, 0)).assigned == ()  # type: ignore[union-attr]
    assert reg.stage_counters["m"] == 7
    stray = [e for e in reg.events if e.tag == "m#prod"]
    assert stray and stray[0].version is None and stray[0].counter is None


def test_push_sends_the_artifacts_history_with_the_version(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    git(project, "remote", "add", "origin", str(origin))
    git(project, "push", "-q", "origin", "main")
    at(monkeypatch, 1)
    ok(project, "tag", "tiny@v0.1.0", "-q")
    at(monkeypatch, 2)
    ok(project, "promote", "tiny@v0.1.0", "prod", "-q")
    at(monkeypatch, 3)
    ok(project, "unassign", "tiny", "prod", "-q")
    at(monkeypatch, 4)
    ok(project, "deprecate", "tiny@v0.1.0", "-q")
    pushed = json.loads(ok(project, "push", "tiny@v0.1.0", "--json"))
    remote_tags = {line.split("refs/tags/")[1] for line in
                   git(project, "ls-remote", "--tags", "origin").splitlines()
                   if not line.endswith("^{}")}
    assert set(pushed["tags"]) == remote_tags
    assert {"tiny@v0.1.0", "tiny@v0.1.0!", "tiny#prod#1", "tiny#prod!#2"} <= remote_tags
