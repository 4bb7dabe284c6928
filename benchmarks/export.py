"""``modelver export --format safetensors`` of a 1 GiB checkpoint against the raw I/O it needs.

    python benchmarks/export.py [DIR]      # DIR: where to write (default: a temporary directory)

A model of four 8192×8192 fp32 Linear layers (1 GiB of weights, with AdamW's moments 3 GiB on
disk) is saved once with ``CheckpointManager``. Then, alternating, three times each on the same
disk: the export (``api.export``, what ``modelver export STEP --to OUT`` runs: every byte read
hash-checked, written, fdatasync'd, swapped in), a raw read of the model's checkpoint files plus
a raw write of the same bytes with fdatasync (1 MiB calls, as the export makes), and the whole
command in a new process (its Python start-up and torch import included). Before
each run the checkpoint's pages are dropped from the page cache (``posix_fadvise(DONTNEED)``
after an fsync), so both read from disk. Prints the medians and their ratio (goal ≤ 1.3).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from modelver import CheckpointManager, api

WIDTH, LAYERS, RUNS = 8192, 4, 3
BUF = 1 << 20


def drop_cache(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw(step: Path, out: Path) -> float:
    """Read the model's files, write as many bytes into one new file, fdatasync it."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for f in sorted(step.glob("model-*.safetensors")):
            with open(f, "rb", buffering=0) as src:
                while n := src.readinto(view):
                    os.write(fd_out, view[:n])
        os.fdatasync(fd_out)
    finally:
        os.close(fd_out)
    return time.perf_counter() - t0


def export(step: Path, out: Path) -> float:
    """What ``modelver export STEP --to OUT`` runs once its interpreter has started."""
    t0 = time.perf_counter()
    api.export(str(step), to=out)
    return time.perf_counter() - t0


def command(step: Path, out: Path) -> float:
    """The whole command, a new Python process (its start-up and imports included)."""
    cmd = [sys.executable, "-m", "modelver.cli.main", "export", str(step), "--to", str(out), "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mv-export-"))
    base.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    with CheckpointManager(base / "ck", keep_last=1) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    del model, opt
    step = base / "ck" / "step-00000001"
    gib = sum(f.stat().st_size for f in step.glob("model-*.safetensors")) / (1 << 30)
    kinds = {"export": export, "raw": raw, "command": command}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(RUNS):
        for what, timed in kinds.items():
            out = base / f"{what}-{i}"
            drop_cache(step)
            times[what].append(timed(step, out))
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    exp, ref = (statistics.median(times[k]) for k in ("export", "raw"))
    print(f"model weights: {gib:.2f} GiB")
    print("| what | median s (of 3) | runs |")
    print("| --- | --- | --- |")
    for k in kinds:
        print(f"| {k} | {statistics.median(times[k]):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times[k])} |")
    print(f"ratio export / (raw read + raw write): {exp / ref:.2f}")
    shutil.rmtree(base / "ck")


if __name__ == "__main__":
    main()
