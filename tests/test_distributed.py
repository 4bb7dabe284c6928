"""torch.distributed: DDP under torchrun (gloo, CPU) and sharded (FSDP2/DTensor) state via DCP.

Multi-process tests start ``python -m torch.distributed.run`` (about 9 s per start on a 2-core
machine) and are marked slow; the in-process ones use a one-rank gloo group.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from modelver import (
    CheckpointManager,
    ResumableSampler,
    load_checkpoint,
    restore_checkpoint,
    verify_checkpoint,
)
from modelver.checkpoint import format as fmt
from modelver.cli.main import cli
from modelver.diff import DiffSide, diff_checkpoints
from modelver.errors import CheckpointCorruptedError, ModelverWarning
from modelver.hashing import xxh3_bytes
from tests.helpers import TESTS, repo_env, saving, weights_equal

SCRIPT = TESTS / "ddp_train_script.py"
TOTAL = 60


def torchrun_cmd(nproc: int, *args: str | Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--standalone", str(SCRIPT), *map(str, args),
    ]  # fmt: skip


def torchrun(nproc: int, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        torchrun_cmd(nproc, *args), capture_output=True, text=True, timeout=300, env=repo_env()
    )
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Final weights of an uninterrupted 2-process run (saving does not change training)."""
    tmp = tmp_path_factory.mktemp("ddp-ref")
    out = tmp / "reference.safetensors"
    torchrun(2, "train", tmp / "ck", out, TOTAL)
    return out


# --- sampler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_shards_like_distributed_sampler(world: int) -> None:
    ds = range(23)
    for r in range(world):
        ours = ResumableSampler(ds, seed=7, num_replicas=world, rank=r)
        theirs = DistributedSampler(ds, num_replicas=world, rank=r, seed=7)  # type: ignore[arg-type]
        for epoch in range(2):
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
        assert len(ours) == len(theirs) and ours.modelver_per_rank


def test_sampler_resumes_its_rank_share_and_refuses_another_rank() -> None:
    ds = list(range(23))
    sampler = ResumableSampler(ds, seed=1, num_replicas=2, rank=1)
    loader = DataLoader(ds, batch_size=4, sampler=sampler)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(2)]
    state = sampler.state_dict()
    assert state["position"] == 8 and state["rank"] == 1
    rest = [b.tolist() for b in it]
    again = ResumableSampler(ds, seed=1, num_replicas=2, rank=1)
    again.load_state_dict(state)
    assert [b.tolist() for b in DataLoader(ds, batch_size=4, sampler=again)] == rest
    mine = [i for batch in seen + rest for i in batch]
    assert mine == ResumableSampler(ds, seed=1, num_replicas=2, rank=1).order(0)
    other = ResumableSampler(ds, seed=1, num_replicas=2, rank=0).order(0)
    assert set(other) | set(mine) == set(ds) and len(other) == len(mine) == 12
    with pytest.raises(ValueError, match="rank 1 of 2"):
        ResumableSampler(ds, seed=1, num_replicas=2, rank=0).load_state_dict(state)
    assert not ResumableSampler(ds).modelver_per_rank
    assert "num_replicas" not in ResumableSampler(ds).state_dict()  # single-process unchanged


# --- one-rank group in this process: the DCP path without torchrun ------------------------------


def fsdp_state(hidden: int = 8) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.1)}


def full(state: dict) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {f"model/{k}": v for k, v in state["model"].state_dict().items()}
    for pid, st in state["optimizer"].state_dict()["state"].items():
        out.update({f"optimizer/{pid}/{k}": v for k, v in st.items()})
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in out.items()}


def test_fsdp2_state_goes_through_dcp_into_the_manifest(
    tmp_path: Path, one_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fsdp_state()
    for _ in range(2):
        state["model"](torch.randn(5, 4)).pow(2).mean().backward()
        state["optimizer"].step()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    mgr.save(2, state)
    expected = full(state)
    path = tmp_path / "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "MANIFEST.json", "dcp-model", "dcp-optimizer", "optimizer-00000.safetensors",
        "rank-00000.json", "state.json",
    ]  # fmt: skip
    assert not list(path.rglob(".metadata"))  # DCP's pickled metadata is never written
    manifest = verify_checkpoint(path)
    assert manifest.tensors["model/0.weight@0,0"].file == "dcp-model/00000.safetensors"
    assert manifest.world_size == 1
    # the chunks are indexed by the rank that wrote them, not in rank 0's manifest
    raw = json.loads((path / fmt.MANIFEST).read_text())
    assert raw["format_version"] == fmt.INDEX_FORMAT_VERSION
    assert raw["index"] == ["dcp-model/index-00000.json", "dcp-optimizer/index-00000.json"]
    assert not any("@" in name for name in raw["tensors"])
    shard = json.loads((path / "dcp-model" / "index-00000.json").read_text())
    assert "model/0.weight@0,0" in shard["tensors"]

    fresh = fsdp_state(hidden=8)  # a fresh optimizer without state: restored sharded anyway
    with torch.no_grad():
        for p in fresh["model"].parameters():
            p.zero_()
    assert CheckpointManager(tmp_path).restore(fresh) == 2
    got = full(fresh)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    dist.destroy_process_group()  # now a plain process: full tensors assembled, no pickle
    try:

        def forbidden(*a: object, **k: object) -> None:
            raise AssertionError("pickle used on the load path")

        monkeypatch.setattr(pickle, "loads", forbidden)
        monkeypatch.setattr(pickle, "load", forbidden)
        monkeypatch.setattr(torch, "load", forbidden)
        ck = load_checkpoint(path)
        assert torch.equal(ck.state["model"]["0.weight"], expected["model/0.weight"])
        assert torch.equal(
            ck.state["optimizer"]["state"][1]["exp_avg_sq"], expected["optimizer/1/exp_avg_sq"]
        )
        plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        restore_checkpoint(path, {"model": plain})
        assert torch.equal(plain[2].bias, expected["model/2.bias"])
    finally:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())


def test_a_crafted_index_shard_is_one_clear_error(tmp_path: Path, one_rank_group: None) -> None:
    state = fsdp_state()
    CheckpointManager(tmp_path, keep_last=None).save(1, state)
    path = tmp_path / "step-00000001"
    shard = path / "dcp-model" / "index-00000.json"
    doc = json.loads(shard.read_text())
    entry = doc["tensors"]["model/0.weight@0,0"]
    entry["offsets"] = [entry["offsets"][0] + 10**9, entry["offsets"][1] + 10**9]
    for crafted, rehash in ((json.dumps(doc), False), (json.dumps(doc), True)):
        shard.write_text(crafted)
        if rehash:  # the manifest made to agree: the entry itself is then refused
            _rehash(path, "dcp-model/index-00000.json")
        with pytest.raises(CheckpointCorruptedError, match=r"index-00000\.json"):
            verify_checkpoint(path)
        with pytest.raises(CheckpointCorruptedError, match=r"index-00000\.json"):
            load_checkpoint(path)


def _rehash(path: Path, name: str) -> None:
    """The manifest made to agree with a crafted member, so only its content is judged."""
    raw = json.loads((path / fmt.MANIFEST).read_text())
    raw["files"][name].update(size=(path / name).stat().st_size,
                              hash=xxh3_bytes((path / name).read_bytes()))
    (path / fmt.MANIFEST).write_text(json.dumps(raw))


def _edit_json(path: Path, name: str, edit: Any) -> None:
    doc = json.loads((path / name).read_text())
    edit(doc)
    (path / name).write_text(json.dumps(doc))
    _rehash(path, name)


def test_chunk_boxes_live_only_in_the_index_shards(tmp_path: Path, one_rank_group: None) -> None:
    CheckpointManager(tmp_path, keep_last=None).save(1, fsdp_state())
    meta = json.loads((tmp_path / "step-00000001" / fmt.STATE_FILE).read_text())
    assert meta["sharded"]["model/0.weight"] == {"dtype": "float32", "shape": [8, 4]}


def test_crafted_chunk_layouts_are_refused_before_anything_changes(
    tmp_path: Path, one_rank_group: None
) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=None)
    state = fsdp_state()
    mgr.save(1, state)
    index = "dcp-model/index-00000.json"

    def crafted(step: int, name: str, edit: Any) -> Path:
        mgr.save(step, state)
        path = tmp_path / fmt.step_dirname(step)
        _edit_json(path, name, edit)
        return path

    def renamed(old: str, new: str) -> Any:
        return lambda d: d["tensors"].__setitem__(new, d["tensors"].pop(old))

    def grown(shapes: dict[str, list[int]]) -> Any:
        return lambda d: [d["sharded"][n].update(shape=s) for n, s in shapes.items()]

    # a chunk whose box leaves its tensor, of no sharded tensor, or not a box at all
    for step, new in ((2, "model/2.bias@1"), (3, "model/9.bias@0"), (4, "model/2.bias@x")):
        path = crafted(step, index, renamed("model/2.bias@0", new))
        with pytest.raises(CheckpointCorruptedError, match="does not match the file header"):
            verify_checkpoint(path)
        with pytest.raises(CheckpointCorruptedError, match="a chunk inside a sharded tensor"):
            load_checkpoint(path)
    # the tensor grown in state.json: its one chunk no longer covers it
    path = crafted(5, fmt.STATE_FILE, grown({"model/2.bias": [6]}))
    for read in (verify_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointCorruptedError, match=r"model/2\.bias: .* without data"):
            read(path)
    # and restored in place into live shards of the grown shape: refused before DCP writes
    path = crafted(6, fmt.STATE_FILE, grown({"model/2.bias": [6], "model/2.weight": [6, 8]}))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    live = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    fully_shard(live, mesh=init_device_mesh("cpu", (1,)))
    before = {k: v.full_tensor().clone() for k, v in live.state_dict().items()}
    with pytest.raises(CheckpointCorruptedError, match="without data"):
        restore_checkpoint(path, {"model": live}, restore_rngs=False)
    assert all(torch.equal(v.full_tensor(), before[k]) for k, v in live.state_dict().items())
    for step in (5, 6):  # they do not fit the model: a mismatch, not a corruption
        shutil.rmtree(tmp_path / fmt.step_dirname(step))
    # every hash agrees, so the ranks choose step 4 (fallback is for damage) and refuse it
    fresh = fsdp_state(hidden=8)
    before = full(fresh)
    with pytest.raises(CheckpointCorruptedError, match=r"step-00000004 .*model/2\.bias@x"):
        mgr.restore(fresh)
    assert all(torch.equal(v, before[k]) for k, v in full(fresh).items())


def test_corrupted_chunk_is_found_by_verify_and_diff_reads_the_index(
    tmp_path: Path, one_rank_group: None
) -> None:
    state = fsdp_state()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    mgr.save(1, state)
    with torch.no_grad():
        state["model"][2].bias.add_(1.0)
    mgr.save(2, state)
    a, b = tmp_path / "step-00000001", tmp_path / "step-00000002"
    result = diff_checkpoints(DiffSide(a, "a"), DiffSide(b, "b"))
    changed = {t.name for t in result.tensors if t.status != "unchanged"}
    assert changed == {"model/2.bias@0"}
    chunk = b / "dcp-model" / "00000.safetensors"
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"dcp-model/00000\.safetensors"):
        verify_checkpoint(b)
    fresh = fsdp_state()
    with pytest.warns(ModelverWarning, match="skipping corrupted checkpoint"):
        assert CheckpointManager(tmp_path).restore(fresh) == 1


def test_fsdp2_with_delta_checkpoints_keeps_dcp_shards_plain(
    tmp_path: Path, one_rank_group: None
) -> None:
    state = fsdp_state(hidden=32)
    mgr = CheckpointManager(tmp_path, keep_last=None, delta_full_every=3)
    for s in range(1, 4):
        state["model"](torch.randn(5, 4)).pow(2).mean().backward()
        state["optimizer"].step()
        mgr.save(s, state)
    expected = full(state)
    for s in range(1, 4):
        path = tmp_path / fmt.step_dirname(s)
        verify_checkpoint(path)
        assert not list(path.glob("dcp-*/*.delta"))
    fresh = fsdp_state(hidden=32)
    assert CheckpointManager(tmp_path, delta_full_every=3).restore(fresh) == 3
    got = full(fresh)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# --- DDP under torchrun ---------------------------------------------------------------------------


def test_ddp_checkpoint_layout_verify_and_cli(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    torchrun(2, "train", ck, tmp_path / "out.safetensors", 12, "--every", "6", "--keep", "0")
    path = ck / "step-00000012"
    manifest = verify_checkpoint(path)
    assert manifest.world_size == 2 and {"rank-00000.json", "rank-00001.json"} <= set(
        manifest.files
    )
    assert [f for f in manifest.files if f.startswith("model-")] == ["model-00000.safetensors"]
    ranks = [json.loads((path / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    data = [r["components"]["data"]["state"] for r in ranks]
    assert [d["rank"] for d in data] == [0, 1] and data[0]["position"] == data[1]["position"]
    assert ranks[0]["rng"]["torch"] != ranks[1]["rng"]["torch"]  # per-rank RNG kept apart
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000006", "step-00000012"]
    assert load_checkpoint(path).state["model"].keys() == {"0.weight", "0.bias", "3.weight",
                                                            "3.bias"}  # fmt: skip
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(path)])
    assert ok.exit_code == 0, ok.output
    rank_file = path / "rank-00001.json"
    rank_file.write_text(rank_file.read_text().replace('"position"', '"positioN"'))
    bad = runner.invoke(cli, ["verify", str(path)])
    assert bad.exit_code == 1 and "rank-00001.json" in bad.output


@pytest.mark.slow
def test_ddp_async_saves_end_as_the_synchronous_run(tmp_path: Path, reference: Path) -> None:
    """Async under a process group: the same training, and checkpoints any rank count can read."""
    out = tmp_path / "async.safetensors"
    ck = tmp_path / "ck"
    torchrun(2, "train", ck, out, TOTAL, "--every", "5", "--async-save")
    assert weights_equal(reference, out)
    assert [c.step for c in CheckpointManager(ck).checkpoints()] == [55, 60]
    assert verify_checkpoint(ck / "step-00000060").world_size == 2


def test_async_save_of_sharded_state_is_a_snapshot(tmp_path: Path, one_rank_group: None) -> None:
    """The background save writes the shards as they were when save returned."""
    state = fsdp_state()
    state["model"](torch.randn(5, 4)).pow(2).mean().backward()
    state["optimizer"].step()
    expected = full(state)
    mgr = CheckpointManager(tmp_path, async_save=True, keep_last=None)
    assert mgr.save(1, state) is None
    with torch.no_grad():  # training goes on meanwhile
        for p in state["model"].parameters():
            p.add_(1.0)
    mgr.close()
    fresh = fsdp_state()
    assert CheckpointManager(tmp_path).restore(fresh) == 1
    got = full(fresh)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_ddp_one_rank_dies_and_resume_is_bit_identical(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "out.safetensors"
    args = ["train", tmp_path / "ck", out, TOTAL]
    first = torchrun(2, *args, "--die-at", "20", "--die-rank", "1", check=False)
    assert first.returncode != 0 and not out.exists()
    second = torchrun(2, *args)
    # every 3 steps: 18 is mid-epoch (102 indices per rank, 13 batches per epoch)
    assert "START 18 rank 0" in second.stdout and "START 18 rank 1" in second.stdout
    assert weights_equal(reference, out)


def test_ddp_delta_checkpoints_continue_across_a_rank_death(
    tmp_path: Path, reference: Path
) -> None:
    """Rank 0 stores the replicated model and optimizer as deltas; a rank dies, the restarted
    job continues the chain from the restored checkpoint and ends bit-identical."""
    ck, out = tmp_path / "ck", tmp_path / "out.safetensors"
    args = ["train", ck, out, TOTAL, "--delta", "4", "--keep", "0", "--hidden", "64"]
    first = torchrun(2, *args, "--die-at", "20", "--die-rank", "1", check=False)
    assert first.returncode != 0 and not out.exists()
    second = torchrun(2, *args)
    assert "START 18 rank 0" in second.stdout
    assert weights_equal(reference, out)
    steps = [int(p.name.removeprefix("step-")) for p in sorted(ck.glob("step-*"))]
    bases = {s: fmt.read_manifest(ck / fmt.step_dirname(s)).bases for s in steps}
    # fulls at 3 and 15 (every 4th save); the restart went on from 18 (depth 1): 21, 24, then 27
    assert bases[3] == () and bases[12] == ("step-00000009",) and bases[15] == ()
    assert bases[21] == ("step-00000018",) and bases[24] == ("step-00000021",)
    assert bases[27] == () and bases[30] == ("step-00000027",)
    for s in steps:
        manifest = verify_checkpoint(ck / fmt.step_dirname(s))
        assert manifest.world_size == 2
    assert CliRunner().invoke(cli, ["verify", str(ck / "step-00000024")]).exit_code == 0


def workers_of(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """torchrun starts each worker in its own session: killing its group would orphan them."""
    for _ in range(200):
        kids = [p for p in psutil.Process(proc.pid).children() if "python" in p.name()]
        if len(kids) == 2:
            return kids
        time.sleep(0.05)
    raise AssertionError("torchrun did not start 2 workers")


def sigkill(*procs: psutil.Process) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_ddp_random_sigkills_end_bit_identical(tmp_path: Path, reference: Path) -> None:
    """8 SIGKILLs: every process or one rank, at random moments or while a save is under way."""
    out = tmp_path / "killed.safetensors"
    ck = tmp_path / "ck"
    cmd = torchrun_cmd(2, "train", ck, out, TOTAL, "--every", "1", "--step-sleep", "0.1")
    rng = random.Random(4321)
    kills = inside_save = 0
    starts = []
    while True:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=repo_env())
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("START"), first
        starts.append(int(first.split()[1]))
        workers = workers_of(proc)
        if kills >= 8:
            assert proc.wait(timeout=300) == 0
            break
        if kills % 3 == 2:  # aim at a save: its temp dir exists from mkdir to commit
            deadline = time.monotonic() + 10
            while not saving(ck) and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        assert proc.poll() is None, f"training ended before the kill ({proc.returncode})"
        if kills % 2:
            sigkill(rng.choice(workers))  # torchrun then stops the other rank
        else:
            sigkill(psutil.Process(proc.pid), *workers)
        proc.wait(timeout=120)
        psutil.wait_procs(workers, timeout=60)
        kills += 1
        inside_save += saving(ck)
    assert inside_save >= 2, (kills, inside_save)
    assert starts == sorted(starts) and starts[-1] < TOTAL, starts
    assert weights_equal(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["one-rank", "torchrun"])
def test_sigterm_gives_one_coordinated_checkpoint(
    tmp_path: Path, reference: Path, target: str
) -> None:
    """SIGTERM to one rank, or to torchrun (which passes it to every rank, as on preemption)."""
    out = tmp_path / "out.safetensors"
    ck = tmp_path / "ck"
    args = ["train", ck, out, TOTAL, "--graceful", "--every", "50", "--step-sleep", "0.05"]
    proc = subprocess.Popen(torchrun_cmd(2, *args), stdout=subprocess.PIPE, text=True,
                            env=repo_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("START 0")
    time.sleep(1.0)
    if target == "one-rank":
        workers_of(proc)[1].send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    steps = sorted(p.name for p in ck.iterdir())
    assert len(steps) == 1 and steps[0] != "step-00000050", steps  # saved where the signal came
    manifest = verify_checkpoint(ck / steps[0])
    assert manifest.world_size == 2 and "rank-00001.json" in manifest.files
    resumed = torchrun(2, *args)
    assert f"START {manifest.step} rank 1" in resumed.stdout
    assert weights_equal(reference, out)


@pytest.mark.slow
def test_sharded_state_saved_by_2_loads_in_1_and_4(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    saved = tmp_path / "saved.safetensors"
    torchrun(2, "shard-save", ck, saved)
    expected = load_file(saved)
    manifest = verify_checkpoint(ck)
    assert manifest.world_size == 2
    assert {f for f in manifest.files if f.startswith("dcp-model/")} == {
        "dcp-model/00000.safetensors", "dcp-model/00001.safetensors",
        "dcp-model/index-00000.json", "dcp-model/index-00001.json",
    }  # fmt: skip
    # 1 process, no process group: full tensors assembled from the chunks
    ck_state = load_checkpoint(ck).state
    for name, t in expected.items():
        comp, rest = name.split("/", 1)
        if comp == "model":
            assert torch.equal(ck_state["model"][rest], t), name
        else:
            pid, key = rest.split("/")
            assert torch.equal(ck_state["optimizer"]["state"][int(pid)][key], t), name
    # 4 ranks: DCP reshards into the new mesh (the 5-row layer splits 2/1/1/1)
    loaded = tmp_path / "loaded4.safetensors"
    run = torchrun(4, "shard-load", ck, loaded)
    assert "RESTORED 3" in run.stdout
    assert weights_equal(saved, loaded)


@pytest.mark.slow
def test_cli_tags_shows_checks_out_and_diffs_a_ddp_checkpoint(tmp_path: Path) -> None:
    """A 2-rank checkpoint as a DVC stage output goes through the registry like any other."""
    from tests.helpers import dvc, git

    root = tmp_path / "proj"
    root.mkdir()
    git(root, "init", "-q")
    cmd = " ".join(torchrun_cmd(2, "train", "checkpoints", tmp_path / "w.safetensors", 12,
                                "--every", "6", "--keep", "0"))
    (root / "dvc.yaml").write_text(
        f"stages:\n  train:\n    cmd: {cmd}\n    outs:\n      - checkpoints:\n"
        "          persist: true\nartifacts:\n  ddp:\n    path: checkpoints\n    type: model\n"
    )
    runner = CliRunner()
    from modelver import api

    api.init(root)
    dvc(root, "repro", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "ddp run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        tagged = runner.invoke(cli, ["tag", "ddp@v0.1.0"])
        assert tagged.exit_code == 0, tagged.output
        shown = runner.invoke(cli, ["show", "ddp@v0.1.0", "--json"])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["step"] == 12
        out = tmp_path / "out"
        got = runner.invoke(cli, ["checkout", "ddp@v0.1.0", "--to", str(out)])
        assert got.exit_code == 0, got.output
        restored = out / "step-00000012"
        assert verify_checkpoint(restored).world_size == 2
        assert runner.invoke(cli, ["verify", "ddp@v0.1.0"]).exit_code == 0
        d = runner.invoke(cli, ["diff", "ddp@v0.1.0", str(root / "checkpoints" / "step-00000006"),
                                "--json"])
        assert d.exit_code == 0, d.output
        statuses = {t["status"] for t in json.loads(d.output)["tensors"]}
        assert statuses == {"changed"}  # six more steps moved every weight and moment
    finally:
        os.chdir(cwd)
