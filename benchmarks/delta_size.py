"""Bytes per checkpoint with delta encoding (CheckpointManager(delta_full_every=K)) against plain
checkpoints of the same states, in one run; plus save and restore times.

    python benchmarks/delta_size.py --model demo            # the demo pipeline's digits MLP
    python benchmarks/delta_size.py --model lm --saves 6    # a ~110M-parameter causal LM

Both managers save every state the training loop reaches after --gap optimizer steps (AdamW),
the plain one first on even saves, the delta one first on odd saves. "stored" is what a step
directory holds on disk; "new" is what a DVC cache or remote grows by for it (files already
stored by an earlier checkpoint, such as frozen or unchanged tensors, count once). The last
checkpoint of a chain is then restored from each directory (hot page cache, median of 3) and the
two restored states are compared bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from delta_ratio import TinyLM  # the same causal LM (run as a script: benchmarks/ is on the path)
from torch import nn

from modelver import CheckpointManager, load_checkpoint
from modelver.checkpoint import format as fmt

ROOT = Path(__file__).resolve().parents[1]


def lm_setup(args: argparse.Namespace) -> tuple[dict, Callable[[], float], str]:
    vocab, seq, batch = args.vocab, 64, 4
    torch.manual_seed(0)
    succ = torch.randint(0, vocab, (vocab, 8))  # a sparse Markov chain: something to learn
    model = TinyLM(vocab, args.d_model, args.layers, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> float:
        tok = torch.empty(batch, seq + 1, dtype=torch.long)
        tok[:, 0] = torch.randint(0, vocab, (batch,))
        for i in range(seq):
            tok[:, i + 1] = succ[tok[:, i], torch.randint(0, 8, (batch,))]
        loss = nn.functional.cross_entropy(
            model(tok[:, :-1]).reshape(-1, vocab), tok[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    n = sum(p.numel() for p in model.parameters())
    desc = f"causal LM, {n / 1e6:.1f}M parameters (fp32), AdamW lr 3e-4, batch {batch}x{seq}"
    return {"model": model, "optimizer": opt}, step, desc


def demo_setup(args: argparse.Namespace) -> tuple[dict, Callable[[], float], str]:
    """The demo pipeline's model, optimizer and schedule (examples/digits, params.yaml)."""
    import yaml
    from sklearn.datasets import load_digits

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from common import make_model  # type: ignore[import-not-found]
    from train import make_scheduler  # type: ignore[import-not-found]

    p = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    torch.manual_seed(p["seed"])
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = make_model(hidden=p["hidden"], dropout=p["dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    sched = make_scheduler(opt, p)

    def step() -> float:
        idx = torch.randint(0, len(x), (p["batch_size"],))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    n = sum(q.numel() for q in model.parameters())
    desc = f"demo digits MLP, {n:,} parameters, AdamW + warmup/decay as in params.yaml"
    return {"model": model, "optimizer": opt, "scheduler": sched}, step, desc


def stored(path: Path) -> dict[str, int]:
    """File content md5 -> size, for every file of a step directory (what DVC stores)."""
    out = {}
    for f in path.iterdir():
        out[hashlib.md5(f.read_bytes(), usedforsecurity=False).hexdigest()] = f.stat().st_size
    return out


def flat(loaded: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    walk("", loaded)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["demo", "lm"], default="demo")
    ap.add_argument("--saves", type=int, default=10)
    ap.add_argument("--gap", type=int, default=None, help="steps between saves (demo 100, lm 5)")
    ap.add_argument("--warmup", type=int, default=None, help="steps before the first save")
    ap.add_argument("--full-every", type=int, default=10, help="delta_full_every K")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    demo = args.model == "demo"
    gap = args.gap or (100 if demo else 5)
    warmup = args.warmup if args.warmup is not None else (0 if demo else 20)
    torch.set_num_threads(2)
    state, step, desc = (demo_setup if demo else lm_setup)(args)
    work = Path(args.dir or tempfile.mkdtemp(prefix="modelver-delta-"))
    plain_root, delta_root = work / "plain", work / "delta"
    plain = CheckpointManager(plain_root, keep_last=None)
    delta = CheckpointManager(delta_root, keep_last=None, delta_full_every=args.full_every)
    print(f"{desc}; warmup {warmup} steps, then a save every {gap} steps; "
          f"delta_full_every={args.full_every}")
    print("\n| save | step | plain stored | delta stored | ratio | delta new (DVC) | "
          "plain save s | delta save s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    seen_p: set[str] = set()
    seen_d: set[str] = set()
    rows = []
    done = 0
    for _ in range(warmup):
        step()
    for i in range(args.saves):
        for _ in range(gap):
            step()
        done += gap
        times = {}
        order = [("plain", plain), ("delta", delta)]
        for name, mgr in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            mgr.save(warmup + done, state)
            times[name] = time.perf_counter() - t0
        sp = stored(plain_root / fmt.step_dirname(warmup + done))
        sd = stored(delta_root / fmt.step_dirname(warmup + done))
        new_p = sum(v for k, v in sp.items() if k not in seen_p)
        new_d = sum(v for k, v in sd.items() if k not in seen_d)
        seen_p |= sp.keys()
        seen_d |= sd.keys()
        ps, ds = sum(sp.values()), sum(sd.values())
        rows.append((ps, ds, new_p, new_d, times["plain"], times["delta"]))
        print(f"| {i + 1} | {warmup + done} | {ps:,} | {ds:,} | {ps / ds:.2f} | {new_d:,} | "
              f"{times['plain']:.2f} | {times['delta']:.2f} |", flush=True)
    plain.close()
    delta.close()
    tot_p = sum(r[2] for r in rows)
    tot_d = sum(r[3] for r in rows)
    deltas_only = [r for r in rows[1:] if r[1] < r[0]]
    print(f"\nall {args.saves} saves: plain {tot_p:,} new bytes, delta {tot_d:,} "
          f"-> {tot_p / tot_d:.2f}x fewer bytes in the DVC cache/remote")
    if deltas_only:
        ratio = statistics.median(r[0] / r[1] for r in deltas_only)
        print(f"delta checkpoints only: median {ratio:.2f}x smaller than plain "
              f"({len(deltas_only)} of {args.saves - 1} after the first)")
    print(f"save time: plain median {statistics.median(r[4] for r in rows):.3f} s, "
          f"delta median {statistics.median(r[5] for r in rows):.3f} s")
    last = fmt.step_dirname(warmup + done)
    chain = len(fmt.read_manifest(delta_root / last).bases)
    times_r: dict[str, list[float]] = {"plain": [], "delta": []}
    loaded = {}
    for _ in range(3):
        for name, root in (("plain", plain_root), ("delta", delta_root)):
            t0 = time.perf_counter()
            loaded[name] = load_checkpoint(root / last)
            times_r[name].append(time.perf_counter() - t0)
    a, b = flat(loaded["plain"].state), flat(loaded["delta"].state)
    same = a.keys() == b.keys() and all(
        a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8)) for k in a
    )
    depth = 0
    path = delta_root / last
    while fmt.read_manifest(path).bases:
        depth += 1
        path = delta_root / fmt.read_manifest(path).bases[0]
    print(f"restore of {last} (delta chain depth {depth}{'' if chain else ', full'}): "
          f"plain {statistics.median(times_r['plain']):.3f} s, "
          f"delta {statistics.median(times_r['delta']):.3f} s; bit-identical: {same}")
    if not args.dir:
        shutil.rmtree(work)
    if not same:
        raise SystemExit("restored states differ")


if __name__ == "__main__":
    main()
