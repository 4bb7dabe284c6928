"""modelver export (safetensors and Hugging Face directories) and partial restore.

Exports are loaded back with the real loaders: ``safetensors.torch.load_file`` into
``load_state_dict(strict=True)``, and ``transformers``' ``from_pretrained`` (a tiny GPT-2 built
from a config: nothing downloaded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from modelver import CheckpointManager, load_checkpoint
from modelver.checkpoint import format as fmt
from modelver.checkpoint.export import export_checkpoint
from modelver.checkpoint.restore import restore_partial
from modelver.errors import InvalidArgumentError, ModelverWarning, StateMismatchError
from tests.helpers import git, one_error_line, run
from tests.test_distributed import fsdp_state, full, torchrun
from tests.test_transformers_integration import tiny_model, training_args


class Net(nn.Module):
    """Tied weights (stored once, an alias in state.json), an int buffer, two dtypes' worth."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("seen", torch.tensor(3))
        if extra:
            self.extra = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(x))))


def trained(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def saved(root: Path, state: dict[str, Any], step: int = 1, **kw: Any) -> Path:
    with CheckpointManager(root, keep_last=None, **kw) as mgr:
        mgr.save(step, state)
    return root / fmt.step_dirname(step)


def assert_loads(files: dict[str, torch.Tensor], model: nn.Module) -> None:
    fresh = Net()
    fresh.load_state_dict(files, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


# --- safetensors -------------------------------------------------------------------------------


def test_safetensors_export_is_the_model_bit_for_bit_with_provenance(tmp_path: Path) -> None:
    state = trained()
    step_dir = saved(tmp_path / "ck", state)
    res = run(tmp_path, "export", str(step_dir), "--to", "out", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert [f["name"] for f in out["files"]] == ["model.safetensors"]
    files = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(files) == sorted(state["model"].state_dict())  # no optimizer, no model/ prefix
    assert_loads(files, state["model"])
    assert files["seen"].dtype == torch.int64
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["modelver.step"] == "1"
    assert meta["modelver.manifest"] == fmt.hash_member(step_dir, fmt.MANIFEST)


def test_dtype_cast_and_shards_in_the_hugging_face_layout(tmp_path: Path) -> None:
    state = trained()
    step_dir = saved(tmp_path / "ck", state)
    res = export_checkpoint(step_dir, tmp_path / "out", dtype="bfloat16", max_shard_size=200)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) == len(res.files) - 1 > 1
    assert all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    files: dict[str, torch.Tensor] = {}
    for n in shards:
        files.update(load_file(tmp_path / "out" / n))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in files.values())
    for k, v in state["model"].state_dict().items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert files[k].dtype == want.dtype and torch.equal(files[k], want), k


def test_delta_checkpoint_exports_its_decoded_weights(tmp_path: Path) -> None:
    state = trained()
    root = tmp_path / "ck"
    with CheckpointManager(root, keep_last=None, delta_full_every=4) as mgr:
        mgr.save(1, state)
        with torch.no_grad():
            state["model"].fc.weight.mul_(1.0001)
        mgr.save(2, state)
    assert fmt.read_manifest(root / "step-00000002").deltas  # stored as a delta
    export_checkpoint(root, tmp_path / "out")  # a root: its newest checkpoint
    assert_loads(load_file(tmp_path / "out" / "model.safetensors"), state["model"])


def test_fsdp2_shards_are_consolidated(tmp_path: Path, one_rank_group: None) -> None:
    state = fsdp_state()
    state["model"](torch.randn(5, 4)).pow(2).mean().backward()
    state["optimizer"].step()
    step_dir = saved(tmp_path / "ck", state)
    expected = {k.removeprefix("model/"): v for k, v in full(state).items()
                if k.startswith("model/")}
    export_checkpoint(step_dir, tmp_path / "out")
    files = load_file(tmp_path / "out" / "model.safetensors")
    assert files.keys() == expected.keys()
    assert all(torch.equal(files[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_ddp_and_two_rank_dcp_checkpoint_exports_full_tensors(tmp_path: Path) -> None:
    ck, gathered = tmp_path / "ck", tmp_path / "full.safetensors"
    torchrun(2, "shard-save", ck, gathered)
    assert fmt.read_manifest(next(ck.glob("step-*"))).world_size == 2
    export_checkpoint(ck, tmp_path / "out")
    files = load_file(tmp_path / "out" / "model.safetensors")
    expected = {k.removeprefix("model/"): v for k, v in load_file(gathered).items()
                if k.startswith("model/")}
    assert files.keys() == expected.keys()
    assert all(torch.equal(files[k], v) for k, v in expected.items())


def test_a_version_records_its_tag_commit_and_checkpoint(project: Path) -> None:
    assert run(project, "tag", "tiny@v1.0.0", "-q").exit_code == 0
    res = run(project, "export", "tiny@v1.0.0", "--to", "export", "-q")
    assert res.exit_code == 0 and res.stdout == "", res.stderr
    with safe_open(project / "export" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    shown = json.loads(run(project, "show", "tiny@v1.0.0", "--json").stdout)
    assert meta["modelver.version"] == "tiny@v1.0.0"
    assert meta["modelver.commit"] == git(project, "rev-parse", "HEAD")
    assert meta["modelver.checkpoint"] == shown["checkpoint_hash"]
    step_dir = project / "checkpoints" / meta["modelver.step_dir"]
    expected = load_checkpoint(step_dir).state["model"]
    files = load_file(project / "export" / "model.safetensors")
    assert files.keys() == expected.keys()
    assert all(torch.equal(files[k], v) for k, v in expected.items())


# --- refusals: one line, nothing written ---------------------------------------------------------


def test_corrupted_checkpoint_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    step_dir = saved(tmp_path / "ck", trained())
    weights = next(step_dir.glob("model-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # a tensor byte: sizes and the header still look right
    weights.write_bytes(bytes(data))
    res = run(tmp_path, "export", str(step_dir), "--to", "out")
    line = one_error_line(res, exit_code=1)
    assert "corrupted" in line and weights.name in line
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no DIR, no half-written side directory


def test_destination_and_argument_refusals(tmp_path: Path) -> None:
    step_dir = saved(tmp_path / "ck", trained())
    src = str(step_dir)
    assert run(tmp_path, "export", src, "--to", "out").exit_code == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    # an earlier export: refused without --force, replaced with it
    assert "not empty" in one_error_line(run(tmp_path, "export", src, "--to", "out"))
    assert run(tmp_path, "export", src, "--to", "out", "--force", "--dtype", "float16",
               "-q").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != before
    (tmp_path / "out" / "notes.txt").write_text("mine")
    line = one_error_line(run(tmp_path, "export", src, "--to", "out", "--force"))
    assert "notes.txt" in line and (tmp_path / "out" / "notes.txt").exists()
    # never into the checkpoint, never anything but a model-like component, hf needs a config
    for args, words in (
        (["--to", str(step_dir / "x")], "outside the checkpoint"),
        (["--to", "o2", "--component", "optimizer"], "mapping of tensors"),
        (["--to", "o2", "--component", "nope"], "a component of the checkpoint"),
        (["--to", "o2", "--format", "hf"], "hf_config"),
    ):
        assert words in one_error_line(run(tmp_path, "export", src, *args), exit_code=2)
    assert not (tmp_path / "o2").exists() and not (step_dir / "x").exists()
    bad = run(tmp_path, "export", src, "--to", "o2", "--max-shard-size", "5 parsecs")
    assert bad.exit_code == 2 and "not a size" in bad.stderr


# --- Hugging Face ------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


def logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.arange(10).reshape(1, 10)).logits


def test_hand_written_loop_exports_a_from_pretrained_directory(
    tmp_path: Path, offline: None
) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.arange(10).reshape(1, 10), labels=torch.arange(10).reshape(1, 10)).loss.backward()
    opt.step()
    with CheckpointManager(tmp_path / "ck") as mgr:
        mgr.save(1, {"model": model, "optimizer": opt},
                 extras={"hf_config": model.config.to_dict()})
    res = export_checkpoint(tmp_path / "ck", tmp_path / "hf", format="hf")
    assert {f.name for f in res.files} == {"model.safetensors", "config.json"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(logits(loaded), logits(model))
    export_checkpoint(tmp_path / "ck", tmp_path / "bf16", format="hf", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(half.transformer.h[0].mlp.c_fc.weight,
                       model.transformer.h[0].mlp.c_fc.weight.to(torch.bfloat16))


def test_trainer_records_the_config_and_exports_what_it_trained(
    tmp_path: Path, offline: None
) -> None:
    from modelver.integrations.transformers import ModelverTrainer
    from tests.helpers import TokenData

    trainer = ModelverTrainer(
        model=tiny_model(), train_dataset=TokenData(8),
        args=training_args(tmp_path / "run", max_steps=2, save_steps=2, warmup_steps=0),
    )
    trainer.train()
    step_dir = trainer.modelver_checkpoint_dir() / "step-00000002"
    assert fmt.read_manifest(step_dir).extras["hf_config"]["model_type"] == "gpt2"
    res = run(tmp_path, "export", str(step_dir), "--to", "hf", "--format", "hf")
    assert res.exit_code == 0, res.stderr
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(logits(loaded), logits(trainer.model))


# --- partial restore -----------------------------------------------------------------------------


def test_partial_restore_reports_what_it_left_out(tmp_path: Path) -> None:
    state = trained()
    saved(tmp_path / "ck", state)
    bigger = Net(extra=True)
    kept = bigger.extra.weight.detach().clone()
    with pytest.raises(StateMismatchError, match=r"extra\.weight"):  # the default stays strict
        CheckpointManager(tmp_path / "ck").restore({"model": bigger})
    report = restore_partial(tmp_path / "ck", {"model": bigger})
    assert report.step == 1 and report.restored == ("model",)
    assert report.missing == ("model/extra.weight", "model/extra.bias")
    assert report.unexpected == () and report.left_out == ("optimizer",)
    assert torch.equal(bigger.extra.weight, kept)
    assert torch.equal(bigger.fc.weight, state["model"].fc.weight)
    with pytest.warns(ModelverWarning, match=r"model/extra\.weight"):
        assert CheckpointManager(tmp_path / "ck").restore({"model": Net(extra=True)},
                                                          strict=False) == 1


def test_only_a_prefix_is_restored_and_bad_selections_change_nothing(tmp_path: Path) -> None:
    state = trained()
    saved(tmp_path / "ck", state)
    fresh = Net()
    emb = fresh.emb.weight.detach().clone()
    report = restore_partial(tmp_path / "ck", {"model": fresh}, only=["model/fc."])
    assert torch.equal(fresh.fc.weight, state["model"].fc.weight)
    assert torch.equal(fresh.fc.bias, state["model"].fc.bias)
    assert torch.equal(fresh.emb.weight, emb)  # same file as fc: not overwritten
    assert "model/emb.weight" in report.left_out and "optimizer" in report.left_out
    with pytest.raises(InvalidArgumentError, match="model/nope"):
        restore_partial(tmp_path / "ck", {"model": fresh}, only=["model/nope"])
    wider = Net()
    wider.fc = nn.Linear(8, 8, bias=False)
    wider.fc.weight = nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(StateMismatchError):  # bias gone and strict: refused, nothing loaded
        restore_partial(tmp_path / "ck", {"model": wider}, only=["model/fc."], strict=True)
    assert torch.equal(wider.fc.weight, torch.zeros(8, 8))
    n = Net()
    n.emb = nn.Embedding(12, 8)
    with pytest.raises(StateMismatchError, match="shape"):  # a shape never fits, strict or not
        restore_partial(tmp_path / "ck", {"model": n})
