"""Benchmarks of `modelver diff` (and `modelver list`) against the targets of issue 3.

diff: two checkpoints of ``--size-gib`` each (``--tensors`` float32 tensors, every other one
changed), written with the real ``CheckpointManager.save`` into a temporary directory. Measured
in one run, interleaved, ``--runs`` times each (medians reported):

- ``read both``: the baseline, every file of both checkpoints read once (16 MiB ``readinto``);
- ``diff --stat``: in-process (``api.diff(stat=True)``) and end to end (a fresh CLI process);
- ``diff`` (full): in-process, compared with the baseline (target ≤ 1.5×);
- peak memory of a full diff in a fresh CLI process (``ru_maxrss``; target ≤ 2 × the largest
  tensor + 200 MB), and of a process that only imports what the CLI imports, for reference.

The checkpoints are in the page cache (just written), as they are for a diff run right after
training; both the baseline and the diff read from it.

    python benchmarks/diff_list.py [--runs 3] [--size-gib 1] [--tensors 16] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    what: str
    value: str
    target: str
    ok: bool | None
    note: str = ""


def median_of(runs: int, fn: Callable[[], object]) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def read_all(*dirs: Path) -> int:
    """Read every file under ``dirs`` once, as a reader that must see all bytes would."""
    buf = bytearray(16 * MIB)
    view = memoryview(buf)
    total = 0
    for d in dirs:
        for p in sorted(d.iterdir()):
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
    return total


def make_checkpoints(root: Path, *, size_gib: float, n_tensors: int) -> tuple[Path, Path, int]:
    """A and B of ``size_gib`` each; every other tensor of B differs from A (small noise)."""
    import torch

    from modelver import CheckpointManager

    numel = int(size_gib * (1 << 30)) // 4 // n_tensors
    g = torch.Generator().manual_seed(0)
    a = {f"layer{i:02d}.weight": torch.randn(numel, generator=g) for i in range(n_tensors)}
    b = {
        k: (t + 1e-3 * torch.randn(numel, generator=g) if i % 2 == 0 else t)
        for i, (k, t) in enumerate(a.items())
    }
    for name, step, tensors in (("a", 1, a), ("b", 2, b)):
        mgr = CheckpointManager(root / name, keep_last=None)
        mgr.save(step, {"model": tensors}, metrics={"loss": 1.0 / step})
        mgr.close()
    return root / "a" / "step-00000001", root / "b" / "step-00000002", numel * 4


# Runs the CLI and reports the process's own peak RSS (VmHWM). ru_maxrss from wait4 is no good
# here: a child started by vfork/exec inherits the high-water mark of this big parent process.
CHILD = """
import atexit, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_KIB " + line.split()[1] + "\\n")
atexit.register(hwm)
if sys.argv[1:]:
    from modelver.cli.main import main
    sys.argv[0] = "modelver"
    main()
else:
    import torch, modelver.api, modelver.diff, modelver.cli.diff
"""


def run_child(args: list[str]) -> tuple[int, float]:
    """(peak resident set in bytes, wall time) of a fresh CLI process ``modelver ARGS``."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"modelver {' '.join(args)} failed: {proc.stderr}")
    peak = [int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("PEAK_KIB")]
    return peak[-1] * 1024, wall


def bench_diff(args: argparse.Namespace, tmp: Path) -> list[Row]:
    from modelver import api

    size = int(args.size_gib * (1 << 30))
    free = shutil.disk_usage(tmp).free
    if free < 2.5 * size:
        raise SystemExit(f"need {2.5 * size / (1 << 30):.1f} GiB free in {tmp}, have {free >> 30}")
    t0 = time.perf_counter()
    ca, cb, largest = make_checkpoints(tmp, size_gib=args.size_gib, n_tensors=args.tensors)
    print(f"wrote 2 x {size / (1 << 30):.2f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
    cli = ["diff", str(ca), str(cb)]

    read_t, full_t, stat_t, stat_cli_t, ratios = [], [], [], [], []
    result = None
    for _ in range(args.runs):
        t_read = median_of(1, lambda: read_all(ca, cb))[0]
        t0 = time.perf_counter()
        result = api.diff(str(ca), str(cb))
        t_full = time.perf_counter() - t0
        read_t.append(t_read)
        full_t.append(t_full)
        ratios.append(t_full / t_read)
        stat_t.append(median_of(1, lambda: api.diff(str(ca), str(cb), stat=True))[0])
        stat_cli_t.append(run_child([*cli, "--stat", "--json"])[1])
    assert result is not None
    peaks = [run_child([*cli, "--json"])[0] for _ in range(args.runs)]
    imports = [run_child([])[0] for _ in range(args.runs)]
    peak, base = statistics.median(peaks), statistics.median(imports)
    mem_target = 2 * largest + 200 * 1000 * 1000
    s = result.summary
    total_read = read_all(ca, cb)
    med = statistics.median
    return [
        Row(
            "checkpoints",
            f"2 x {size / (1 << 30):.2f} GiB",
            "",
            None,
            f"{args.tensors} x {largest / MIB:.0f} MiB float32; {s.counts['changed']} changed, "
            f"{s.counts['unchanged']} unchanged",
        ),
        Row(
            "read both (baseline)",
            f"{med(read_t):.3f} s",
            "",
            None,
            f"{total_read / MIB:.0f} MiB read",
        ),
        Row(
            "diff --stat (api)",
            f"{med(stat_t) * 1000:.1f} ms",
            "< 1 s",
            med(stat_t) < 1.0,
            "manifests only",
        ),
        Row(
            "diff --stat (CLI process)",
            f"{med(stat_cli_t):.3f} s",
            "< 1 s",
            med(stat_cli_t) < 1.0,
            "fresh interpreter + imports",
        ),
        Row(
            "diff full (api)",
            f"{med(full_t):.3f} s",
            f"<= {1.5 * med(read_t):.3f} s",
            med(full_t) <= 1.5 * med(read_t),
            f"read {s.bytes_read / MIB:.0f} MiB of tensor data",
        ),
        Row(
            "full / read ratio",
            f"{med(full_t) / med(read_t):.2f}x",
            "<= 1.5x",
            med(full_t) / med(read_t) <= 1.5,
            "per run: " + ", ".join(f"{r:.2f}" for r in ratios),
        ),
        Row(
            "peak RSS full diff (CLI)",
            f"{peak / MIB:.0f} MiB",
            f"<= {mem_target / MIB:.0f} MiB",
            peak <= mem_target,
            f"imports alone {base / MIB:.0f} MiB; diff adds {(peak - base) / MIB:.0f} MiB",
        ),
    ]


def print_table(rows: list[Row], runs: int) -> None:
    mark = {True: "yes", False: "NO", None: ""}
    headers = ("measure", f"median of {runs}", "target", "met", "note")
    cells = [(r.what, r.value, r.target, mark[r.ok], r.note) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--tmp", type=Path, default=None, help="where to write (default: system tmp)")
    args = p.parse_args()
    if args.runs < 1 or args.tensors < 2:
        p.error("--runs >= 1 and --tensors >= 2")
    tmp = Path(tempfile.mkdtemp(prefix="modelver-bench-", dir=args.tmp))
    try:
        rows = bench_diff(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print_table(rows, args.runs)


if __name__ == "__main__":
    main()
