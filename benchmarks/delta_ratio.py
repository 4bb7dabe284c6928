"""How well do XOR deltas between two AdamW checkpoints compress? (numbers for docs/scale.md)

    python benchmarks/delta_ratio.py [--warmup 200] [--gaps 1,10,100,300] [--level 3]

Trains a small GPT-like causal LM (fp32 weights, AdamW) on synthetic Markov-chain tokens, takes
snapshot A after --warmup steps (so the moments are warm, not freshly zero), keeps training and
takes snapshot B after each gap. For each kind of tensor it prints raw/compressed ratios of:
  zstd        zstd of B alone (no delta)
  xor         zstd of (A XOR B), the raw bits
  xor+split   zstd of (A XOR B) with the bytes of each element split into planes first
Tensors are compressed one by one, as a per-tensor delta store would, and the sizes summed.
"bf16 weights" is the bf16 cast of the fp32 weights (the 2-byte copy a mixed-precision run keeps).
"""

from __future__ import annotations

import argparse
import time

import torch
import zstandard
from torch import nn

KINDS = ("fp32 weights", "bf16 weights", "exp_avg", "exp_avg_sq")


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            max(1, d_model // 64),
            4 * d_model,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    state = [opt.state[p] for p in params]
    return {
        "fp32 weights": [p.detach().clone() for p in params],
        "bf16 weights": [p.detach().to(torch.bfloat16) for p in params],
        "exp_avg": [s["exp_avg"].clone() for s in state],
        "exp_avg_sq": [s["exp_avg_sq"].clone() for s in state],
    }


def int_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def byte_planes(t: torch.Tensor) -> bytes:
    """Element bytes regrouped into planes (all byte 0s, then all byte 1s, ...)."""
    b = t.contiguous().view(torch.uint8).reshape(-1, t.element_size())
    return b.t().contiguous().numpy().tobytes()


def measure(
    a: list[torch.Tensor], b: list[torch.Tensor], cctx: zstandard.ZstdCompressor
) -> dict[str, float]:
    raw = plain = xor = split = unchanged = elems = 0
    for ta, tb in zip(a, b, strict=True):
        ia, ib = int_view(ta), int_view(tb)
        raw += tb.numel() * tb.element_size()
        plain += len(cctx.compress(ib.numpy().tobytes()))
        x = torch.bitwise_xor(ia, ib)
        xor += len(cctx.compress(x.numpy().tobytes()))
        split += len(cctx.compress(byte_planes(x)))
        unchanged += int((x == 0).sum())
        elems += x.numel()
    return {
        "raw": raw,
        "zstd": raw / plain,
        "xor": raw / xor,
        "xor+split": raw / split,
        "unchanged": unchanged / elems,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=200, help="steps before snapshot A")
    ap.add_argument("--gaps", default="1,10,100,300", help="steps from A to each snapshot B")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--level", type=int, default=3, help="zstd level")
    args = ap.parse_args()
    gaps = sorted(int(g) for g in args.gaps.split(","))
    vocab, seq, batch = 512, 64, 8
    torch.manual_seed(0)
    # sparse random Markov chain: 8 possible successors per token, so there is something to learn
    succ = torch.randint(0, vocab, (vocab, 8))
    model = TinyLM(vocab, args.d_model, args.layers, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    cctx = zstandard.ZstdCompressor(level=args.level)

    def train_step() -> float:
        tok = torch.empty(batch, seq + 1, dtype=torch.long)
        tok[:, 0] = torch.randint(0, vocab, (batch,))
        for i in range(seq):
            tok[:, i + 1] = succ[tok[:, i], torch.randint(0, 8, (batch,))]
        logits = model(tok[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tok[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = train_step()
    snap_a = snapshot(model, opt)
    print(
        f"model: {n_params:,} params, AdamW lr={args.lr} betas=(0.9,0.95) wd=0.1, "
        f"snapshot A after {args.warmup} steps (loss {loss:.3f}); zstd level {args.level}"
    )
    print("\n| gap (steps) | tensors | zstd alone | XOR+zstd | XOR+planes+zstd | unchanged elems |")
    print("|---:|---|---:|---:|---:|---:|")
    done = 0
    for gap in gaps:
        while done < gap:
            loss = train_step()
            done += 1
        snap_b = snapshot(model, opt)
        for kind in KINDS:
            m = measure(snap_a[kind], snap_b[kind], cctx)
            print(
                f"| {gap} | {kind} | {m['zstd']:.3f} | {m['xor']:.3f} | {m['xor+split']:.3f} "
                f"| {100 * m['unchanged']:.1f}% |"
            )
    print(f"\nfinal loss {loss:.3f}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
