"""Does a save's cost, or a restore's, grow with the number of checkpoints kept? (issue 13)

    python benchmarks/save_many.py [--kept 20 510 1510] [--saves 20] [--restores 10]

A tiny state (one 8x8 linear layer, an SGD optimizer) is saved with ``keep_last=None`` until
the directory holds each ``--kept`` count; at each count the next ``--saves`` saves are timed
one by one and the median printed, with its ratio to the first count's. Everything a save does
after the write (retention's plan over what the directory holds) is in the figure. Then
``--restores`` restores, each by a fresh manager (construction, choosing the newest
checkpoint, verifying and loading it), are timed the same way.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from modelver import CheckpointManager


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", type=int, nargs="+", default=[20, 510, 1510])
    ap.add_argument("--saves", type=int, default=20)
    ap.add_argument("--restores", type=int, default=10)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    rows: list[tuple[int, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="modelver-many-") as tmp:
        ck = Path(tmp) / "ck"
        mgr = CheckpointManager(ck, keep_last=None)
        step = 0
        for kept in sorted(a.kept):
            while step < kept:
                step += 1
                mgr.save(step, state)
            times = []
            for _ in range(a.saves):
                step += 1
                t0 = time.perf_counter()
                mgr.save(step, state)
                times.append(time.perf_counter() - t0)
            mgr.close()  # its lock: a restore's manager takes it
            restores = []
            for _ in range(a.restores):
                t0 = time.perf_counter()
                with CheckpointManager(ck, keep_last=None) as other:
                    other.restore(state)
                restores.append(time.perf_counter() - t0)
            rows.append((kept, statistics.median(times), statistics.median(restores)))
            mgr = CheckpointManager(ck, keep_last=None)
        mgr.close()
    print(f"{'checkpoints kept':>16} {'save ms (median)':>17} {'x first':>8} "
          f"{'restore ms (median)':>20} {'x first':>8}")
    for kept, t, r in rows:
        print(f"{kept:16d} {t * 1e3:17.2f} {t / rows[0][1]:8.2f} {r * 1e3:20.2f} "
              f"{r / rows[0][2]:8.2f}")


if __name__ == "__main__":
    main()
