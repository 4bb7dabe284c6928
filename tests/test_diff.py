"""`modelver diff`: tensor statistics, manifest-only paths, params/metrics, CLI and refs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from modelver import api
from modelver.checkpoint import CheckpointManager
from modelver.checkpoint import format as fmt
from modelver.cli.main import cli
from modelver.diff import (
    DiffSide,
    TensorDiff,
    diff_checkpoints,
    diff_metrics,
    diff_params,
    flatten_params,
)
from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError, UnknownRefError


def save(root: Path, step: int, tensors: Mapping[str, Any], **metrics: float) -> Path:
    """One real checkpoint (CheckpointManager.save) holding ``{"w": tensors}``."""
    mgr = CheckpointManager(root, keep_last=None)
    try:
        mgr.save(step, {"w": dict(tensors)}, metrics=metrics)
    finally:
        mgr.close()
    return root / fmt.step_dirname(step)


def side(path: Path, **kw: Any) -> DiffSide:
    return DiffSide(path, str(path), **kw)


def by_name(tensors: tuple[TensorDiff, ...]) -> dict[str, TensorDiff]:
    return {t.name: t for t in tensors}


def reference_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a64, b64 = a.double().flatten(), b.double().flatten()
    d = a64 - b64
    return {
        "l2": float(d.norm()),
        "rel_change": float(d.norm() / a64.norm()),
        "cosine": float(a64 @ b64 / (a64.norm() * b64.norm())),
        "max_abs": float(d.abs().max()),
    }


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    a = {
        "same": torch.randn(50, generator=g),
        "moved": torch.randn(33, 7, generator=g),
        "tiny": torch.randn(1000, generator=g),
        "half": torch.randn(64, generator=g).to(torch.bfloat16),
        "f16": torch.randn(40, generator=g).half(),
        "ints": torch.arange(30, dtype=torch.int64) * 1000003,
        "mask": torch.rand(25, generator=g) > 0.5,
        "reshaped": torch.randn(6, 4, generator=g),
        "recast": torch.randn(12, generator=g),
        "gone": torch.randn(5, generator=g),
        "zero": torch.zeros(8),
    }
    b = dict(a)
    b.pop("gone")
    b["new"] = torch.ones(3, 3)
    b["moved"] = a["moved"] + 0.1 * torch.randn(33, 7, generator=g)
    b["tiny"] = a["tiny"].clone()
    b["tiny"][17] += 1e-3
    b["half"] = (a["half"].float() * 1.5).to(torch.bfloat16)
    b["f16"] = (a["f16"].float() - 0.25).half()
    b["ints"] = a["ints"] + 1
    b["mask"] = ~a["mask"]
    b["reshaped"] = a["reshaped"].reshape(4, 6).clone()
    b["recast"] = a["recast"].double() + 1
    b["zero"] = torch.full((8,), 2.0)
    pa = save(tmp_path / "a", 10, a, loss=2.0, acc=0.5)
    pb = save(tmp_path / "b", 20, b, loss=1.5, lr=0.1)
    return pa, pb, a, b


def test_statuses_and_stats_match_float64_reference(pair: Any) -> None:
    pa, pb, a, b = pair
    result = diff_checkpoints(side(pa), side(pb))
    t = by_name(result.tensors)
    assert {n: x.status for n, x in t.items()} == {
        "w/same": "unchanged", "w/moved": "changed", "w/tiny": "changed", "w/half": "changed",
        "w/f16": "changed", "w/ints": "changed", "w/mask": "changed", "w/reshaped": "changed",
        "w/recast": "changed", "w/gone": "removed", "w/new": "added", "w/zero": "changed",
    }  # fmt: skip
    for name in ("moved", "tiny", "half", "f16", "ints", "mask", "recast"):
        st = t[f"w/{name}"].stats
        assert st is not None, name
        ref = reference_stats(a[name], b[name])
        assert st.l2 == pytest.approx(ref["l2"], rel=1e-6), name
        assert st.rel_change == pytest.approx(ref["rel_change"], rel=1e-6), name
        assert st.max_abs == pytest.approx(ref["max_abs"], rel=1e-6), name
        assert st.cosine == pytest.approx(ref["cosine"], abs=1e-9), name
    # one element off by 1e-3: the cosine must still resolve the tiny difference from 1
    tiny = t["w/tiny"].stats
    assert tiny is not None and 0 < 1 - (tiny.cosine or 1) < 1e-5
    assert tiny.max_abs == pytest.approx(1e-3, rel=1e-3)
    # dtype change with equal shapes is compared numerically; both dtypes reported
    recast = t["w/recast"]
    assert recast.a and recast.b and (recast.a.dtype, recast.b.dtype) == ("float32", "float64")
    # shape change: both shapes, no numbers
    reshaped = t["w/reshaped"]
    assert reshaped.stats is None
    assert reshaped.to_json()["shape_a"] == [6, 4] and reshaped.to_json()["shape_b"] == [4, 6]
    assert "l2" not in reshaped.to_json()
    # all-zero A: relative change and cosine are undefined, reported as null
    zero = t["w/zero"].stats
    assert zero is not None and zero.rel_change is None and zero.cosine is None
    assert zero.l2 == pytest.approx(math.sqrt(8 * 4.0))
    s = result.summary
    assert (s.counts["changed"], s.counts["added"], s.counts["removed"], s.counts["unchanged"]) == (
        9, 1, 1, 1,
    )  # fmt: skip
    assert s.nbytes["added"] == 36 and s.nbytes["removed"] == 20
    assert result.a.step == 10 and result.b.step == 20


def test_chunking_gives_the_same_numbers(pair: Any) -> None:
    pa, pb, _, _ = pair
    whole = by_name(diff_checkpoints(side(pa), side(pb)).tensors)
    chunked = by_name(diff_checkpoints(side(pa), side(pb), chunk_elements=7).tensors)
    for name, t in whole.items():
        if t.stats is None:
            assert chunked[name].stats is None
            continue
        c = chunked[name].stats
        assert c is not None
        assert c.l2 == pytest.approx(t.stats.l2, rel=1e-6)
        assert c.max_abs == t.stats.max_abs
        assert (c.cosine is None) == (t.stats.cosine is None)


def test_float32_path_and_parallel_ranges_match_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tensors take the float32 path, split into ranges shared by worker threads."""
    import modelver.diff as mdiff

    g = torch.Generator().manual_seed(1)
    a = {"big": torch.randn(5000, generator=g), "bf": torch.randn(3001, generator=g).bfloat16()}
    b = {"big": a["big"] + 1e-4 * torch.randn(5000, generator=g), "bf": a["bf"] * 2}
    b["big"][123] += 1.0
    pa, pb = save(tmp_path / "a", 1, a), save(tmp_path / "b", 2, b)
    monkeypatch.setattr(mdiff, "EXACT_ELEMENTS", 0)
    monkeypatch.setattr(mdiff, "JOB_ELEMENTS", 700)
    t = by_name(diff_checkpoints(side(pa), side(pb), chunk_elements=256, workers=3).tensors)
    for name in ("big", "bf"):
        st = t[f"w/{name}"].stats
        ref = reference_stats(a[name], b[name])
        assert st is not None
        assert st.l2 == pytest.approx(ref["l2"], rel=1e-6)
        assert st.rel_change == pytest.approx(ref["rel_change"], rel=1e-6)
        assert st.max_abs == pytest.approx(ref["max_abs"], rel=1e-6)
        assert 1 - (st.cosine or 0) == pytest.approx(1 - ref["cosine"], rel=1e-4, abs=1e-12)


def test_progress_reports_bytes_read(pair: Any) -> None:
    pa, pb, _, _ = pair
    calls: list[tuple[int, int]] = []
    result = diff_checkpoints(
        side(pa), side(pb), chunk_elements=16, progress=lambda d, t: calls.append((d, t))
    )
    expected = sum(
        x.a.nbytes + x.b.nbytes for x in result.tensors if x.stats is not None and x.a and x.b
    )
    assert calls[0] == (0, expected) and calls[-1] == (expected, expected)
    assert result.summary.bytes_read == expected
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def _overwrite_tensor_bytes(ckpt: Path, name: str) -> None:
    entry = fmt.read_manifest(ckpt).tensors[name]
    with open(ckpt / entry.file, "r+b") as f:
        f.seek(entry.offsets[0])
        f.write(b"\xff" * entry.nbytes)


def test_unchanged_tensors_are_never_read(pair: Any) -> None:
    pa, pb, _, _ = pair
    # garbage in B's copy of an unchanged tensor: the hashes still say equal, so no read
    _overwrite_tensor_bytes(pb, "w/same")
    t = by_name(diff_checkpoints(side(pa), side(pb)).tensors)
    assert t["w/same"].status == "unchanged" and t["w/same"].stats is None


def test_stat_reads_manifests_only(pair: Any) -> None:
    pa, pb, _, _ = pair
    for f in (*pa.glob("*.safetensors"), *pb.glob("*.safetensors")):
        f.unlink()
    result = diff_checkpoints(side(pa), side(pb), stat=True)
    assert result.stat_only and result.summary.bytes_read == 0
    assert result.summary.counts["changed"] == 9
    assert all(t.stats is None for t in result.tensors)
    with pytest.raises(CheckpointCorruptedError, match="missing"):
        diff_checkpoints(side(pa), side(pb))


def test_truncated_file_is_reported_as_corrupted(tmp_path: Path) -> None:
    pa = save(tmp_path / "a", 1, {"x": torch.randn(1000)})
    pb = save(tmp_path / "b", 1, {"x": torch.randn(1000)})
    entry = fmt.read_manifest(pb).tensors["w/x"]
    path = pb / entry.file
    data = path.read_bytes()
    path.write_bytes(data[: entry.offsets[0] + 100])
    with pytest.raises(CheckpointCorruptedError, match="bytes"):
        diff_checkpoints(side(pa), side(pb))


def test_tensor_range_outside_its_file_is_reported(tmp_path: Path) -> None:
    pa = save(tmp_path / "a", 1, {"x": torch.randn(1000)})
    pb = save(tmp_path / "b", 1, {"x": torch.randn(1000)})
    raw = json.loads((pb / fmt.MANIFEST).read_text())
    start, end = raw["tensors"]["w/x"]["offsets"]
    raw["tensors"]["w/x"]["offsets"] = [start + 10**6, end + 10**6]
    (pb / fmt.MANIFEST).write_text(json.dumps(raw))
    # refused when the manifest is read, before any byte of the data is
    with pytest.raises(CheckpointCorruptedError,
                       match=r"tensors\.w/x\.offsets .* expected a range inside w-0+\.safetensors"):
        diff_checkpoints(side(pa), side(pb))


def test_tied_weights_follow_their_target(tmp_path: Path) -> None:
    def model(scale: float) -> torch.nn.Module:
        torch.manual_seed(0)
        emb, out = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
        out.weight = emb.weight
        with torch.no_grad():
            emb.weight.mul_(scale)
        return torch.nn.ModuleDict({"emb": emb, "out": out})

    dirs = []
    for step, scale in ((1, 1.0), (2, 2.0)):
        mgr = CheckpointManager(tmp_path / "c", keep_last=None)
        mgr.save(step, {"model": model(scale)})
        mgr.close()
        dirs.append(tmp_path / "c" / fmt.step_dirname(step))
    t = by_name(diff_checkpoints(side(dirs[0]), side(dirs[1])).tensors)
    assert t["model/out.weight"].status == "changed"
    assert t["model/out.weight"].stats == t["model/emb.weight"].stats
    assert t["model/out.weight"].stats is not None
    assert t["model/out.weight"].stats.rel_change == pytest.approx(1.0)


def test_params_are_flattened_and_compared() -> None:
    a = {"train": {"lr": 0.1, "steps": 10, "opt": {"name": "adam"}}, "seed": 0, "tags": [1]}
    b = {"train": {"lr": 0.2, "steps": 10, "opt": {"name": "adam", "eps": 1e-8}}, "tags": [1, 2]}
    assert flatten_params(a)["train.opt.name"] == "adam"
    changes = {c.key: c for c in diff_params(a, b)}
    assert set(changes) == {"train.lr", "train.opt.eps", "seed", "tags"}
    assert (changes["train.lr"].status, changes["train.lr"].a, changes["train.lr"].b) == (
        "changed", 0.1, 0.2,
    )  # fmt: skip
    assert changes["seed"].status == "removed" and changes["train.opt.eps"].status == "added"
    # 1 and 1.0 and True compare equal in Python but are different params
    assert [c.key for c in diff_params({"x": 1}, {"x": 1.0})] == ["x"]
    assert diff_params({"x": {"y": 1}}, {"x": {"y": 1}}) == ()


def test_metrics_have_deltas() -> None:
    m = {d.name: d for d in diff_metrics({"loss": 2.0, "acc": 0.5}, {"loss": 1.5, "f1": 0.7})}
    assert m["loss"].delta == pytest.approx(-0.5) and m["loss"].rel_delta == pytest.approx(-0.25)
    assert m["acc"].b is None and m["acc"].delta is None
    assert m["f1"].to_json() == {"a": None, "b": 0.7, "delta": None, "rel_delta": None}


def test_nan_in_a_tensor_gives_valid_json(tmp_path: Path) -> None:
    x = torch.randn(10)
    y = x.clone()
    y[3] = float("nan")
    pa, pb = save(tmp_path / "a", 1, {"x": x}), save(tmp_path / "b", 1, {"x": y})
    result = diff_checkpoints(side(pa), side(pb))
    st = result.tensors[0].stats
    assert st is not None and math.isnan(st.max_abs) and math.isnan(st.l2)
    text = json.dumps(result.to_json(), allow_nan=False)
    assert json.loads(text)["tensors"][0]["l2"] is None


# --- API and CLI on directories ---------------------------------------------------------------


def test_api_takes_a_checkpoints_root_outside_git(pair: Any, tmp_path: Path) -> None:
    pa, pb, _, _ = pair
    save(tmp_path / "b", 5, {"x": torch.zeros(1)})  # older step: the root means step 20
    result = api.diff(str(pa), str(tmp_path / "b"), repo_root=tmp_path)
    assert result.b.step == 20 and result.b.path == pb.resolve()
    assert result.params is None  # directories carry no params.yaml
    with pytest.raises(CheckpointNotFoundError):
        api.diff(str(pa), str(tmp_path / "nowhere"), repo_root=tmp_path)
    with pytest.raises(UnknownRefError, match="workspace"):
        api.diff(str(pa), repo_root=tmp_path)  # no repository, so no workspace for B


def test_cli_json_is_pure_and_complete(pair: Any) -> None:
    pa, pb, _, _ = pair
    res = CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) >= {"params", "metrics", "tensors", "summary"}
    assert data["metrics"]["loss"] == {"a": 2.0, "b": 1.5, "delta": -0.5, "rel_delta": -0.25}
    moved = next(t for t in data["tensors"] if t["name"] == "w/moved")
    assert moved["status"] == "changed"
    assert set(moved) >= {"l2", "rel_change", "cosine", "max_abs", "shape_a", "dtype_b"}
    assert data["summary"]["changed"] == 9 and data["summary"]["unchanged"] == 1
    stat = json.loads(
        CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--json", "--stat"]).stdout
    )
    assert stat["stat"] is True and stat["summary"]["bytes_read"] == 0
    assert all("l2" not in t for t in stat["tensors"])


def test_cli_table_lists_changed_tensors_by_relative_change(pair: Any) -> None:
    pa, pb, _, _ = pair
    res = CliRunner().invoke(cli, ["diff", str(pa), str(pb)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "9 changed" in out and "1 unchanged" in out and "w/new" in out and "w/gone" in out
    # component "w" is a section of its own, its tensors named inside it; shape change first,
    # then by relative change: "zero" (undefined = infinite) before "tiny"
    rows = [line.split()[0] for line in out[out.index("w: 9 of 12 tensors changed"):]
            .splitlines()[3:12]]
    assert rows.index("reshaped") < rows.index("zero") < rows.index("half") < rows.index("tiny")
    top = CliRunner().invoke(cli, ["diff", "--top", "2", str(pa), str(pb)])
    assert "reshaped " in top.stdout and "tiny " not in top.stdout
    assert "7 more changed tensors in w" in top.stdout
    quiet = CliRunner().invoke(cli, ["diff", "-q", str(pa), str(pb)])
    assert quiet.exit_code == 0 and quiet.stdout.strip().startswith("tensors: 9 changed")
    assert len(quiet.stdout.strip().splitlines()) == 1


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["diff", str(tmp_path / "x"), str(tmp_path / "y")])
    assert res.exit_code == 1
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:")


def test_installed_script(pair: Any) -> None:
    exe = shutil.which("modelver") or str(Path(sys.executable).with_name("modelver"))
    if not Path(exe).is_file():
        pytest.skip("modelver is not installed (pip install -e .)")
    pa, pb, _, _ = pair
    out = subprocess.run(
        [exe, "diff", str(pa), str(pb), "--json", "--stat"], capture_output=True, text=True,
        check=True, env=os.environ.copy(),
    )  # fmt: skip
    assert json.loads(out.stdout)["summary"]["added"] == 1


# --- versions in a Git + DVC repository -------------------------------------------------------


def test_diff_between_versions_and_the_workspace(project: Path, monkeypatch: Any) -> None:
    from tests.helpers import set_params, train_and_commit

    root = project  # trained to step 20, committed
    api.tag("tiny@v0.1.0", repo_root=root)
    set_params(root, steps=40, lr=0.02)
    train_and_commit(root, "longer")
    api.tag("tiny@v0.2.0", repo_root=root)
    monkeypatch.chdir(root)

    result = api.diff("tiny@v0.1.0", "tiny@v0.2.0")
    assert (result.a.step, result.b.step) == (20, 40)
    assert result.params is not None
    assert {p.key: (p.a, p.b) for p in result.params} == {
        "train.steps": (20, 40), "train.lr": (0.05, 0.02),
    }  # fmt: skip
    assert "loss" in {m.name for m in result.metrics}
    changed = [t for t in result.tensors if t.status == "changed"]
    assert changed and all(t.stats is not None and t.stats.l2 > 0 for t in changed)

    # B defaults to the workspace (which holds step 40 = v0.2.0): nothing changed
    res = CliRunner().invoke(cli, ["diff", "tiny@v0.2.0", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["b"]["ref"] == "workspace" and data["b"]["step"] == 40
    assert data["summary"]["changed"] == 0 and data["params"] == {}

    # --stat between versions reads their manifests alone: nothing is materialised
    shutil.rmtree(root / ".dvc" / "tmp" / "modelver", ignore_errors=True)
    stat = api.diff("tiny@v0.1.0", "tiny@v0.2.0", stat=True)
    assert stat.a.path is None and stat.summary.counts == result.summary.counts
    assert not (root / ".dvc" / "tmp" / "modelver").exists()
    # ... even when the data is only in the remote: two listings and two manifests come back
    api.push(repo_root=root)
    shutil.rmtree(root / ".dvc" / "cache")
    again = api.diff("tiny@v0.1.0", "tiny@v0.2.0", stat=True)
    assert again.summary.counts == result.summary.counts
    # (and two state.json, which name the tensors' places)
    fetched = [p for p in (root / ".dvc" / "cache").rglob("*") if p.is_file()]
    assert len(fetched) == 6, fetched

    # a version against a plain directory, and an unknown version
    ws = root / "checkpoints" / fmt.step_dirname(40)
    assert api.diff("tiny@v0.1.0", str(ws), stat=True).summary.counts["changed"] > 0
    bad = CliRunner().invoke(cli, ["diff", "tiny@v9.9.9"])
    assert bad.exit_code == 1 and "unknown reference" in bad.stderr

    # text: versions as the user named them, with commit and step; no scratch paths
    text = CliRunner().invoke(cli, ["diff", "tiny@v0.1.0", "tiny"], env={"COLUMNS": "80"})
    assert text.exit_code == 0, text.output
    head = text.stdout.splitlines()[:2]
    assert head[0].startswith("A tiny@v0.1.0  step 20 · commit ")
    assert head[1].startswith("B tiny  tiny@v0.2.0 · step 40 · commit ")
    assert ".dvc" not in text.stdout and "modelver/" not in text.stdout
    assert all(len(line) <= 80 for line in text.stdout.splitlines()), text.stdout


# --- readable text: model first, optimizer state by parameter name, tables that fit ----------


def _train(root: Path, steps: tuple[int, ...], opt_params: Any = None) -> list[Path]:
    """A tiny model and AdamW saved at each of ``steps`` (one optimizer step between)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters() if opt_params is None else opt_params(model))
    mgr = CheckpointManager(root, keep_last=None)
    for step in steps:
        opt.zero_grad()
        model(torch.randn(8, 3)).square().sum().backward()
        for p in (p for g in opt.param_groups for p in g["params"] if p.grad is None):
            p.grad = torch.ones_like(p)  # a parameter outside the model still gets state
        opt.step()
        mgr.save(step, {"model": model, "optimizer": opt})
    mgr.close()
    return [root / fmt.step_dirname(s) for s in steps]


def test_optimizer_state_is_named_after_its_parameter(tmp_path: Path) -> None:
    # two groups, in an order unlike model.parameters(): the ids map by identity, not by order
    def groups(m: Any) -> list[dict[str, Any]]:
        return [{"params": [m[2].weight]}, {"params": [m[0].weight, m[0].bias, m[2].bias]}]

    pa, pb = _train(tmp_path / "c", (1, 2), groups)
    result = diff_checkpoints(side(pa), side(pb))
    names = [t.name for t in result.tensors]
    assert names[:4] == ["model/0.weight", "model/0.bias", "model/2.weight", "model/2.bias"]
    assert all(n.startswith("optimizer/") for n in names[4:])
    t = by_name(result.tensors)
    assert t["optimizer/state/0/exp_avg"].place is not None
    assert (t["optimizer/state/0/exp_avg"].place.param, t["optimizer/state/0/exp_avg"].place.key
            ) == ("2.weight", "exp_avg")
    assert t["optimizer/state/3/exp_avg_sq"].place.param == "2.bias"  # type: ignore[union-attr]
    row = next(x for x in result.to_json()["tensors"] if x["name"] == "optimizer/state/1/step")
    assert (row["component"], row["role"], row["param"], row["key"]) == (
        "optimizer", "optimizer", "0.weight", "step")

    res = CliRunner().invoke(cli, ["diff", str(pa), str(pb)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    out = res.stdout
    # (the A and B lines name the directories as given: long temporary paths here)
    assert all(len(line) <= 80 for line in out.splitlines()[2:]), out
    assert "state/" not in out and "#" not in out
    assert out.index("model: 4 of 4") < out.index("optimizer: 12 of 12")
    opt_rows = out[out.index("optimizer: 12 of 12"):].splitlines()
    assert opt_rows[1].split() == ["parameter", "exp_avg", "exp_avg_sq", "step"] or \
        opt_rows[1].split() == ["parameter", "step", "exp_avg", "exp_avg_sq"]
    assert [r.split()[0] for r in opt_rows[3:7]] == ["2.weight", "0.weight", "0.bias", "2.bias"]
    assert "L2 diff" not in out and "max |a-b|" not in out
    wide = CliRunner().invoke(cli, ["diff", "--wide", str(pa), str(pb)], env={"COLUMNS": "200"})
    assert "L2 diff" in wide.stdout and "max |a-b|" in wide.stdout and "float32" in wide.stdout
    assert "2.weight" in wide.stdout


def test_a_parameter_of_no_saved_module_is_never_guessed(tmp_path: Path) -> None:
    stray = torch.nn.Parameter(torch.ones(5))
    pa, pb = _train(tmp_path / "c", (1, 2), lambda m: [*m.parameters(), stray])
    t = by_name(diff_checkpoints(side(pa), side(pb)).tensors)
    assert t["optimizer/state/4/exp_avg"].place.param == "#4"  # type: ignore[union-attr]
    assert t["optimizer/state/0/exp_avg"].place.param == "0.weight"  # type: ignore[union-attr]
    out = CliRunner().invoke(cli, ["diff", str(pa), str(pb)]).stdout
    assert "#4" in out and "was not recorded" in out


def test_recorded_param_names_are_checked() -> None:
    from modelver.errors import MalformedDataError
    from modelver.layout import read_layout

    opt = {"state": {}, "param_groups": [{"params": [0, 1]}]}
    for bad in (["model/a"], "model/a", [1, 2]):
        meta = {"components": {"optimizer": {"kind": "stateful", "state": opt,
                                             "param_names": bad}}}
        with pytest.raises(MalformedDataError, match="param_names"):
            read_layout(meta)


def test_diff_html_writes_the_layer_chart(tmp_path: Path) -> None:
    pa, pb = _train(tmp_path / "c", (1, 2))
    page = tmp_path / "d.html"
    res = CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--html", str(page)])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert "model/2.bias" in text and "optimizer/state" not in text
    assert text.count('data-chart="') == 1
    bad = CliRunner().invoke(cli, ["diff", str(pa), str(pb), "--html", str(tmp_path / "no/x")])
    assert bad.exit_code == 2 and bad.stderr.startswith("error:") and "--html" in bad.stderr
    assert not (tmp_path / "no").exists()
