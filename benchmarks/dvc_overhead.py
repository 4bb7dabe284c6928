"""What ``dvc repro`` of a training stage costs on top of the training command itself.

    python benchmarks/dvc_overhead.py [--mib 1024] [--rounds 3] [--steps 1] [--profile]
                                      [--cache-type T]

A temporary Git + DVC repository (``cache.type reflink,hardlink,copy`` as ``modelver init`` sets)
with one stage: ``python train.py`` restores from ``checkpoints/`` (a ``persist: true`` output),
takes ``--steps`` AdamW steps (1: the worst case for the ratio, all I/O and start-up) and saves
one ~``mib`` MiB checkpoint (model + AdamW, ``keep_last=1``).
Timed (medians over ``rounds``, interleaved so machine load hits every case alike; each run starts
after ``os.sync()`` and a 1 s pause, so no run waits on the previous one's writeback):

* ``cmd-first``: the command alone on an empty ``checkpoints/``;
* ``repro-first``: ``dvc repro`` of the stage for the first time (fresh repository each round);
* ``cmd``: the command alone with one checkpoint present (the re-run data state); ``cmd-nohash``
  the same with ``dvc_hashes=False`` (what the MD5s cost the command);
* ``repro-nohash``/``repro``/``repro-async``: ``dvc repro`` after a params change forcing a re-run,
  the checkpoint written with ``dvc_hashes`` off, on, and on with ``async_save``.

The command's time varies by seconds between runs on a shared machine, so each ``dvc repro`` is
also paired with the command it ran: the stage runs ``timed.py``, which times ``train.py`` and
leaves the seconds in ``.cmd-seconds``. "DVC adds" is the median of (repro wall − that command's
wall), and "paired ratio" the median of their quotients: the same run, the same data.

``--profile`` adds one ``dvc repro --cprofile-dump`` per re-run case and prints where DVC's time
went: unprotecting the persist output, hashing outputs, committing to the cache, relinking.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = '''\
import torch, yaml
from modelver import CheckpointManager

p = yaml.safe_load(open("params.yaml"))
torch.manual_seed(0)
width = p["width"]
layers = [torch.nn.utils.skip_init(torch.nn.Linear, width, width) for _ in range(p["layers"])]
model = torch.nn.Sequential(*layers)
for t in model.parameters():
    t.data.uniform_(-0.01, 0.01)
opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
state = {"model": model, "optimizer": opt}
mgr = CheckpointManager("checkpoints", keep_last=1, async_save=p["async"],
                        dvc_hashes=p["dvc_hashes"])
step = mgr.restore(state)
for _ in range(p["steps"]):
    loss = model(torch.randn(4, width)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
mgr.save(step + p["steps"], state)
mgr.close()
'''


TIMED = '''\
import subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call([sys.executable, "train.py"])
open(".cmd-seconds", "w").write(str(time.perf_counter() - t))
sys.exit(rc)
'''


def sh(cmd: list[str], cwd: Path) -> float:
    # start each timed run with the disk drained: otherwise the previous run's writeback (1 GiB
    # written, and DVC's copy into the cache) lands on this run's fsyncs
    os.sync()
    time.sleep(1)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t


def write_params(repo: Path, **params: object) -> None:
    (repo / "params.yaml").write_text(json.dumps(params, sort_keys=True) + "\n")


def make_repo(work: Path, name: str, params: dict[str, object], cache_type: str) -> Path:
    repo = work / name
    repo.mkdir()
    sh(["git", "init", "-q"], repo)
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo)
    sh([sys.executable, "-m", "dvc", "config", "cache.type", cache_type], repo)
    (repo / "train.py").write_text(TRAIN)
    (repo / "timed.py").write_text(TIMED)
    write_params(repo, **params)
    (repo / "dvc.yaml").write_text(
        f"stages:\n  train:\n    cmd: {sys.executable} timed.py\n    deps: [train.py]\n"
        "    params: [lr, async, dvc_hashes]\n"
        "    outs:\n      - checkpoints:\n          persist: true\n"
    )
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "stage"], repo)
    return repo


def profile_breakdown(dump: Path) -> dict[str, float]:
    """Cumulative main-thread seconds of the parts of ``dvc repro`` that scale with data."""
    stats = pstats.Stats(str(dump))
    parts = {
        "run command": ("dvc/stage/run.py", "cmd_run"),
        "unprotect": ("dvc/output.py", "unprotect"),
        "hash outputs": ("dvc_data/hashfile/build.py", "_get_hashes"),
        "commit to cache": ("dvc_data/hashfile/transfer.py", "transfer"),
        "relink": ("dvc_data/hashfile/checkout.py", "checkout"),
    }
    found = dict.fromkeys(parts, 0.0)
    for (file, _, func), row in stats.stats.items():  # type: ignore[attr-defined]
        for label, (suffix, name) in parts.items():
            if func == name and file.endswith(suffix):
                found[label] = max(found[label], row[3])
    found["total in dvc"] = stats.total_tt  # type: ignore[attr-defined]
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024, help="checkpoint size (model + AdamW)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--steps", type=int, default=1, help="AdamW steps per run of the command")
    ap.add_argument("--cache-type", default="reflink,hardlink,copy", help="DVC cache.type")
    a = ap.parse_args()
    width = 4096
    layers = max(1, round(a.mib * 2**20 / (12 * (width * width + width))))
    work = Path(tempfile.mkdtemp(prefix="mv-dvc-overhead-"))
    env_python = [sys.executable]
    dvc = [sys.executable, "-m", "dvc"]
    base = {"width": width, "layers": layers, "lr": 1e-3, "async": False, "dvc_hashes": True,
            "steps": a.steps}
    times: dict[str, list[float]] = {}
    pairs: dict[str, list[tuple[float, float]]] = {}  # repro case -> (wall, its command's wall)

    def record(label: str, seconds: float, repo: Path | None = None) -> None:
        times.setdefault(label, []).append(seconds)
        inner = ""
        if repo is not None:
            cmd_s = float((repo / ".cmd-seconds").read_text())
            pairs.setdefault(label, []).append((seconds, cmd_s))
            inner = f"  (its command {cmd_s:.2f} s, DVC adds {seconds - cmd_s:.2f} s)"
        print(f"  {label:14s} {seconds:7.2f} s{inner}", flush=True)

    lr = 1e-3
    try:
        main_repo = make_repo(work, "main", base, a.cache_type)
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", flush=True)
            first = make_repo(work, f"first{r}", base, a.cache_type)
            record("cmd-first", sh([*env_python, "train.py"], first))
            shutil.rmtree(first / "checkpoints")
            record("repro-first", sh([*dvc, "repro", "-q"], first), first)
            shutil.rmtree(first)
            if r == 0:
                sh([*dvc, "repro", "-q"], main_repo)
            record("cmd", sh([*env_python, "train.py"], main_repo))
            write_params(main_repo, **{**base, "dvc_hashes": False})
            record("cmd-nohash", sh([*env_python, "train.py"], main_repo))
            for label, extra in (
                ("repro-nohash", {"dvc_hashes": False}),
                ("repro", {}),
                ("repro-async", {"async": True}),
            ):
                lr *= 1.01
                write_params(main_repo, **{**base, "lr": lr, **extra})
                record(label, sh([*dvc, "repro", "-q"], main_repo), main_repo)
        status = subprocess.run(
            [*dvc, "status", "-q"], cwd=main_repo, capture_output=True, text=True
        )
        ckpt_bytes = sum(p.stat().st_size for p in (main_repo / "checkpoints").rglob("*"))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\ncheckpoint {ckpt_bytes / 2**30:.2f} GiB, {layers} x Linear({width}) + AdamW, "
              f"{a.steps} step(s) per run; "
              f"cache.type {a.cache_type}; medians of {a.rounds}; "
              f"dvc status clean: {status.returncode == 0 and not status.stdout.strip()}")
        print(f"{'case':14s} {'seconds':>8s} {'ratio':>6s}  baseline")
        for label, baseline in (
            ("cmd-first", None), ("repro-first", "cmd-first"), ("cmd", None),
            ("cmd-nohash", "cmd"),
            ("repro-nohash", "cmd"), ("repro", "cmd"), ("repro-async", "cmd"),
        ):
            ratio = f"{med[label] / med[baseline]:6.2f}" if baseline else "      "
            print(f"{label:14s} {med[label]:8.2f} {ratio}  {baseline or ''}")
        print("\npaired with the command each dvc repro ran (medians):")
        print(f"{'case':14s} {'repro s':>8s} {'its cmd s':>9s} {'DVC adds s':>10s} {'ratio':>6s}")
        for label, runs in pairs.items():
            wall = statistics.median(w for w, _ in runs)
            inner = statistics.median(c for _, c in runs)
            adds = statistics.median(w - c for w, c in runs)
            ratio = statistics.median(w / c for w, c in runs)
            print(f"{label:14s} {wall:8.2f} {inner:9.2f} {adds:10.2f} {ratio:6.2f}")
        if a.profile:
            print("\nmain-thread seconds inside one profiled re-run (dvc repro --cprofile-dump)")
            for label, extra in (("repro-nohash", {"dvc_hashes": False}), ("repro", {})):
                lr *= 1.01
                write_params(main_repo, **{**base, "lr": lr, **extra})
                dump = work / f"{label}.prof"
                wall = sh([*dvc, "repro", "-q", "--cprofile-dump", str(dump)], main_repo)
                parts = profile_breakdown(dump)
                start = wall - parts.pop("total in dvc")
                shown = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
                print(f"{label}: wall {wall:.2f} s = {shown}, process start+import {start:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
