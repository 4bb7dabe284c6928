"""Delta-encoded checkpoints (CheckpointManager(delta_full_every=K)): bit-exact round trips and
resumes, bounded chains, retention that keeps bases, corruption, diff, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from modelver import CheckpointManager, load_checkpoint, verify_checkpoint
from modelver.checkpoint import format as fmt
from modelver.checkpoint.delta import DeltaEncoder, open_logical
from modelver.diff import DiffSide, diff_checkpoints
from modelver.errors import CheckpointCorruptedError, ModelverWarning
from tests.helpers import git, model_hashes, set_params, train_and_commit


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Embedding(128, 64), nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 64)
    )
    model[0].weight.requires_grad_(False)  # a frozen table: stays a plain, identical file
    params = [p for p in model.parameters() if p.requires_grad]
    return {"model": model, "optimizer": torch.optim.AdamW(params, lr=1e-3)}


def train(state: dict, n: int) -> None:
    model, opt = state["model"], state["optimizer"]
    for _ in range(n):
        x = torch.randint(0, 128, (16,))
        loss = (model(x) - model[0](x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    loaded = load_checkpoint(path)
    out = {f"model/{k}": v for k, v in loaded.state["model"].items()}
    for pid, st in loaded.state["optimizer"]["state"].items():
        out.update({f"opt/{pid}/{k}": v for k, v in st.items()})
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8)), k


def save_both(tmp_path: Path, *, full_every: int, saves: int, **kw: object) -> tuple[Path, Path]:
    """Train, saving every 5 steps through a delta manager and a plain one."""
    state = make_state()
    delta = CheckpointManager(tmp_path / "delta", keep_last=None,
                              delta_full_every=full_every, **kw)  # type: ignore[arg-type]
    plain = CheckpointManager(tmp_path / "plain", keep_last=None)
    for i in range(1, saves + 1):
        train(state, 5)
        delta.save(5 * i, state)
        plain.save(5 * i, state)
    delta.close()
    plain.close()
    return tmp_path / "delta", tmp_path / "plain"


@pytest.mark.parametrize("async_save", [False, True])
def test_delta_checkpoints_are_bit_exact_smaller_and_chained(
    tmp_path: Path, async_save: bool
) -> None:
    droot, proot = save_both(tmp_path, full_every=3, saves=7, async_save=async_save)
    steps = [5 * i for i in range(1, 8)]
    for i, step in enumerate(steps):
        d, p = droot / fmt.step_dirname(step), proot / fmt.step_dirname(step)
        verify_checkpoint(d)
        assert_bit_identical(tensors_of(d), tensors_of(p))
        dm, pm = fmt.read_manifest(d), fmt.read_manifest(p)
        assert {k: t.hash for k, t in dm.tensors.items()} == {
            k: t.hash for k, t in pm.tensors.items()
        }
        # a full checkpoint every 3: steps 5, 20, 35; the others decode against the previous
        if i % 3 == 0:
            assert dm.bases == () and dm.format_version == fmt.FORMAT_VERSION
            assert dm.total_bytes == pm.total_bytes
        else:
            assert dm.bases == (fmt.step_dirname(steps[i - 1]),)
            assert dm.format_version == fmt.DELTA_FORMAT_VERSION
            assert set(dm.deltas) == {"model-00000.safetensors", "optimizer-00000.safetensors"}
            assert (d / "model-00000.safetensors.delta").is_file()
            assert not (d / "model-00000.safetensors").exists()
            assert dm.total_bytes < 0.9 * pm.total_bytes
        # the frozen table is stored plain and byte-identical in every checkpoint (DVC dedups)
        frozen = d / "model-frozen-00000.safetensors"
        assert frozen.read_bytes() == (droot / "step-00000005" / frozen.name).read_bytes()


def test_resume_from_a_delta_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path / "ck", every_steps=5, keep_last=None, delta_full_every=4)
    for step in range(1, 21):
        train(state, 1)
        mgr.maybe_save(step, state)
    mgr.close()
    assert fmt.read_manifest(tmp_path / "ck" / "step-00000015").bases == ("step-00000010",)
    again = make_state(seed=1)
    resumed = CheckpointManager(tmp_path / "ck", keep_last=None, delta_full_every=4)
    assert resumed.restore(again, step=15) == 15
    train(again, 5)
    resumed.close()
    live = {f"model/{k}": v for k, v in again["model"].state_dict().items()}
    for pid, st in again["optimizer"].state_dict()["state"].items():
        live.update({f"opt/{pid}/{k}": v for k, v in st.items()})
    assert_bit_identical(live, tensors_of(tmp_path / "ck" / "step-00000020"))


def live_tensors(state: dict) -> dict[str, torch.Tensor]:
    live = {f"model/{k}": v.clone() for k, v in state["model"].state_dict().items()}
    for pid, st in state["optimizer"].state_dict()["state"].items():
        live.update({f"opt/{pid}/{k}": v.clone() for k, v in st.items()})
    return live


def test_each_resumed_process_continues_the_chain_and_bounds_it(tmp_path: Path) -> None:
    """As with `dvc repro` resuming: every process restores, saves once or twice, exits. The
    chain goes on across processes and still has a full checkpoint every K saves."""
    root = tmp_path / "ck"
    expected: dict[int, dict[str, torch.Tensor]] = {}
    step = 0
    for _process in range(4):
        state = make_state(seed=7)  # a fresh process: new objects, restored from disk
        mgr = CheckpointManager(root, keep_last=None, delta_full_every=3, async_save=True)
        assert mgr.restore(state) == step
        for _ in range(2):
            train(state, 3)
            step += 5
            mgr.save(step, state)
            expected[step] = live_tensors(state)
        mgr.close()
    bases = {s: fmt.read_manifest(root / fmt.step_dirname(s)).bases for s in expected}
    assert bases == {5: (), 10: ("step-00000005",), 15: ("step-00000010",), 20: (),
                     25: ("step-00000020",), 30: ("step-00000025",), 35: (),
                     40: ("step-00000035",)}
    for s, want in expected.items():
        verify_checkpoint(root / fmt.step_dirname(s))
        assert_bit_identical(want, tensors_of(root / fmt.step_dirname(s)))
    # a restored optimizer lays its files out as before (same tensor order), so the first save
    # after a restore encodes the same files as a delta as a save within one process does
    within, resumed = (set(fmt.read_manifest(root / fmt.step_dirname(s)).deltas) for s in (10, 15))
    assert within == resumed and any(n.startswith("optimizer") for n in resumed)


def test_retention_keeps_the_bases_of_kept_checkpoints(tmp_path: Path) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path / "ck", keep_last=2, delta_full_every=4)
    for step in range(10, 80, 10):  # fulls at 10 and 50; 60 and 70 decode from 50
        train(state, 2)
        mgr.save(step, state)
    mgr.close()
    kept = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert kept == ["step-00000050", "step-00000060", "step-00000070"]
    for name in kept:
        verify_checkpoint(tmp_path / "ck" / name)


def test_a_damaged_delta_or_base_is_reported_and_skipped(tmp_path: Path) -> None:
    droot, _ = save_both(tmp_path, full_every=10, saves=3)
    s5, s10, s15 = (droot / fmt.step_dirname(s) for s in (5, 10, 15))
    # a flipped byte inside the stored delta of step 15: verify says so, restore takes step 10
    stored = s15 / "model-00000.safetensors.delta"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"model-00000\.safetensors\.delta"):
        verify_checkpoint(s15)
    with pytest.warns(ModelverWarning, match="step-00000015"):
        assert CheckpointManager(droot).restore(make_state(seed=3)) == 10
    # a flipped byte in the base's data: the delta decodes to the wrong content
    base = s5 / "model-00000.safetensors"
    data = bytearray(base.read_bytes())
    data[-3] ^= 0x01
    base.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"decoded from .* differs"):
        verify_checkpoint(s10)
    # a missing base: named
    shutil.rmtree(s5)
    with pytest.raises(CheckpointCorruptedError, match="delta against step-00000005, which is"):
        verify_checkpoint(s10)
    with pytest.raises(CheckpointCorruptedError, match="missing"):
        load_checkpoint(s10)


def test_a_malformed_delta_file_is_a_clear_error(tmp_path: Path) -> None:
    droot, _ = save_both(tmp_path, full_every=10, saves=2)
    s10 = droot / "step-00000010"
    stored = s10 / "model-00000.safetensors.delta"
    size = stored.stat().st_size
    stored.write_bytes(b"\0" * size)  # same size: only the content check sees it
    with pytest.raises(CheckpointCorruptedError, match="malformed"):
        load_checkpoint(s10, verify=False)


def test_diff_of_delta_checkpoints_equals_the_plain_diff(tmp_path: Path) -> None:
    droot, proot = save_both(tmp_path, full_every=10, saves=3)
    a, b = "step-00000010", "step-00000015"
    got = diff_checkpoints(DiffSide(droot / a, "a"), DiffSide(droot / b, "b"), workers=2,
                           chunk_elements=1000)
    want = diff_checkpoints(DiffSide(proot / a, "a"), DiffSide(proot / b, "b"), workers=2,
                            chunk_elements=1000)
    assert [(t.name, t.status, t.stats) for t in got.tensors] == [
        (t.name, t.status, t.stats) for t in want.tensors
    ]
    assert any(t.stats is not None for t in got.tensors)


def test_logical_reads_at_any_offset_match_the_plain_file(tmp_path: Path) -> None:
    droot, proot = save_both(tmp_path, full_every=10, saves=3)
    d = droot / "step-00000015"
    plain = (proot / "step-00000015" / "optimizer-00000.safetensors").read_bytes()
    manifest = fmt.read_manifest(d)
    with open_logical(d, manifest, "optimizer-00000.safetensors") as f:
        assert f.size == len(plain)
        for lo, n in [(0, 8), (3, 1000), (len(plain) // 3, 70_001), (len(plain) - 5, 50)]:
            buf = bytearray(n)
            got = f.pread_into(lo, memoryview(buf))
            assert bytes(buf[:got]) == plain[lo : lo + n]
        f.seek(0)
        assert f.read() == plain


def test_encoder_options_and_fallbacks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="full_every"):
        DeltaEncoder(full_every=1)
    # incompressible changes are stored plain: no chain for nothing
    state = {"t": torch.zeros(200_000, dtype=torch.uint8)}
    mgr = CheckpointManager(tmp_path / "ck", keep_last=None, delta_full_every=5)
    mgr.save(1, state)
    state["t"] = torch.randint(0, 256, (200_000,), dtype=torch.uint8)  # random bytes
    mgr.save(2, state)
    state["t"][::100] += 1  # a small change on top: that compresses
    mgr.save(3, state)
    mgr.close()
    m2 = fmt.read_manifest(tmp_path / "ck" / "step-00000002")
    m3 = fmt.read_manifest(tmp_path / "ck" / "step-00000003")
    assert m2.deltas == {} and m3.bases == ("step-00000002",)
    assert load_checkpoint(tmp_path / "ck" / "step-00000003").state["t"].equal(state["t"])


def test_older_readers_refuse_delta_manifests(tmp_path: Path) -> None:
    droot, _ = save_both(tmp_path, full_every=10, saves=2)
    raw = json.loads((droot / "step-00000010" / fmt.MANIFEST).read_text())
    assert raw["format_version"] == fmt.DELTA_FORMAT_VERSION
    raw["format_version"] = fmt.INDEX_FORMAT_VERSION + 1  # one past the newest this reads
    (droot / "step-00000010" / fmt.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheckpointCorruptedError, match="newer"):
        fmt.read_manifest(droot / "step-00000010")


# --- a delta version through the CLI: tag, verify, checkout --to, diff ---------------------------


def test_cli_tags_verifies_checks_out_and_diffs_a_delta_version(project: Path) -> None:
    from tests.helpers import run

    train_py = project / "train.py"
    text = train_py.read_text()
    text = text.replace("nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)",
                        "nn.Linear(8, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 2)")
    text = text.replace("keep_last=2)", "keep_last=2, delta_full_every=4)")
    train_py.write_text(text)
    set_params(project, steps=30, every=10)
    shutil.rmtree(project / "checkpoints")
    train_and_commit(project, "delta checkpoints")
    last = project / "checkpoints" / "step-00000030"
    assert fmt.read_manifest(last).bases == ("step-00000020",)
    assert run(project, "tag", "tiny@v1.0.0", "-q").exit_code == 0
    res = run(project, "verify", "tiny@v1.0.0")
    assert res.exit_code == 0, res.stderr
    out = project.parent / "exported"
    res = run(project, "checkout", "tiny@v1.0.0", "--to", str(out))
    assert res.exit_code == 0, res.stderr
    # the checkpoint comes with the step directories it decodes against
    assert sorted(p.name for p in out.iterdir()) == [
        "step-00000010", "step-00000020", "step-00000030"]
    verify_checkpoint(out / "step-00000030")
    assert model_hashes(out / "step-00000030") == model_hashes(last)
    # a fresh clone: the version's data comes from the remote, bases included
    assert run(project, "push", "tiny@v1.0.0", "-q").exit_code == 0
    clone = project.parent / "clone"
    git(project.parent, "clone", "-q", str(project), str(clone))
    (clone / ".dvc" / "config.local").write_text((project / ".dvc" / "config.local").read_text())
    res = run(clone, "checkout", "tiny@v1.0.0", "--to", str(project.parent / "exported2"))
    assert res.exit_code == 0, res.stderr
    res = run(clone, "diff", "tiny@v1.0.0", str(out / "step-00000030"), "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)["summary"]
    assert summary["changed"] == 0 and summary["unchanged"] > 0
