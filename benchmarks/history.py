"""Benchmark of `modelver history --json` over 1,000 versions, with `gto history` on the same
repository.

One ``git fast-import`` stream builds the repository: ``--versions`` commits, each with the
registration tag ``modelver tag`` writes (GTO name, metadata line); a stage assignment every
10 versions (prod, then staging), an unassignment every 50, a deregistration (modelver's
"deprecate a version") every 20, and one artifact deprecation, each tag one second after the
previous. Then times, ``--runs`` times each (medians):

- ``api.history`` in-process (one ``git for-each-ref`` call, tag names only);
- ``modelver history --json`` end to end (a fresh CLI process, what a user waits for), and
  ``modelver history --help`` (the same start-up, no work: what every command pays first);
  wall and CPU seconds (on a shared machine the CPU time is the steadier figure), and which
  of torch, GitPython, dvc and numpy each imports (``-X importtime``);
- ``gto history --json`` (one run), unless ``--no-gto``, and checks both list the same events.

Target (issue 16): ``history`` over 1,000 versions under 0.5 s.

    python benchmarks/history.py [--versions 1000] [--runs 5] [--no-gto]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelver import api
from modelver import versions as v

NAME = "bench-model"
WHO = "bench <b@bench.invalid>"
HEAVY = ("torch", "git", "dvc", "numpy")  # top-level packages a command may or may not import


def build(root: Path, n: int) -> int:
    """The repository; returns how many registry events its tags hold."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    chunks: list[bytes] = []
    clock = iter(range(1_700_000_000, 1_800_000_000))
    events = 0

    def blob(text: str) -> None:
        raw = text.encode()
        chunks.append(b"data %d\n%s\n" % (len(raw), raw))

    def tag(name: str, mark: int, summary: str, meta: dict[str, Any] | None) -> None:
        nonlocal events
        events += 1
        chunks.append(f"tag {name}\nfrom :{mark}\ntagger {WHO} {next(clock)} +0000\n".encode())
        blob(v.format_message(summary, meta) if meta is not None else summary + "\n")

    counter = 0
    for i in range(n):
        ver = v.Semver(i // 100, i % 100, 0)
        chunks.append(f"commit refs/heads/main\nmark :{i + 1}\n"
                      f"committer {WHO} {1_600_000_000 + i} +0000\n".encode())
        blob(f"train {i}")
        if i:
            chunks.append(f"from :{i}\n".encode())
        chunks.append(b"M 644 inline step.txt\n")
        blob(str(i * 100))
        tag(v.version_tag(NAME, ver), i + 1, f"Registering artifact {NAME} version {ver}",
            {"modelver": 1, "step": i * 100, "step_dir": f"step-{i * 100:08d}",
             "metrics": {"loss": 1.0 / (i + 1)}, "checkpoint": f"{i:032x}.dir",
             "path": "checkpoints"})
        if i % 10 == 0:
            counter += 1
            stage = "prod" if i % 20 == 0 else "staging"
            tag(v.stage_tag(NAME, stage, counter), i + 1,
                f"Assigning stage {stage} to artifact {NAME} version {ver}",
                {"version": str(ver)})
        if i % 50 == 0:
            counter += 1
            tag(v.event_tag("unassignment", NAME, stage="prod", counter=counter), i + 1,
                f"Unassigning stage 'prod' to artifact '{NAME}' version '{ver}'",
                {"version": str(ver)})
        if i % 20 == 5:
            tag(v.event_tag("deregistration", NAME, version=ver), i + 1,
                f"Deregistering artifact {NAME} version {ver}", None)
    tag(v.event_tag("deprecation", "old-model"), n, "Deprecating artifact 'old-model'", None)
    subprocess.run(["git", "fast-import", "--quiet"], cwd=root, input=b"".join(chunks),
                   check=True)
    return events


def median_seconds(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def cpu_of_children() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def cli_seconds(args: list[str], cwd: Path, runs: int) -> tuple[float, float, str]:
    """Median wall and CPU seconds of a fresh process, and its last stdout."""
    walls, cpus, out = [], [], ""
    for _ in range(runs):
        c, t = cpu_of_children(), time.perf_counter()
        out = subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout
        walls.append(time.perf_counter() - t)
        cpus.append(cpu_of_children() - c)
    return statistics.median(walls), statistics.median(cpus), out


def imported(args: list[str], cwd: Path) -> str:
    """Which of HEAVY one run of ``modelver ARGS`` imports."""
    trace = subprocess.run([sys.executable, "-X", "importtime", "-m", "modelver.cli.main",
                            *args], cwd=cwd, check=True, capture_output=True, text=True).stderr
    loaded = {line.rpartition("|")[2].strip() for line in trace.splitlines()}
    return ", ".join(f"{m}: {'yes' if m in loaded else 'no'}" for m in HEAVY)


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{'command':<{width}}  {'wall s':>7}  {'CPU s':>6}  note")
    for name, wall_s, cpu_s, note in rows:
        print(f"{name:<{width}}  {wall_s:>7}  {cpu_s:>6}  {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--versions", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-gto", action="store_true")
    p.add_argument("--gto-timeout", type=float, default=300)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelver-bench-history-"))
    try:
        repo = tmp / "repo"
        t = time.perf_counter()
        n_events = build(repo, a.versions)
        print(f"built {a.versions} versions, {n_events} events in "
              f"{time.perf_counter() - t:.1f} s: {repo}")
        rows: list[tuple[str, str, str, str]] = []
        sec, got = median_seconds(lambda: api.history(repo_root=repo), a.runs)
        assert len(got) == n_events, (len(got), n_events)
        rows.append(("api.history (in-process)", f"{sec:.3f}", "", f"{len(got)} events"))

        exe = shutil.which("modelver") or str(Path(sys.executable).with_name("modelver"))
        wall, cpu, out = cli_seconds([exe, "history", "--json"], repo, a.runs)
        ours = json.loads(out)
        assert len(ours) == n_events
        rows.append(("modelver history --json (CLI)", f"{wall:.3f}", f"{cpu:.3f}",
                     f"target < 0.5 s: {'yes' if wall < 0.5 else 'NO'}"))
        wall, cpu, _ = cli_seconds([exe, "history", "--help"], repo, a.runs)
        rows.append(("modelver history --help (start-up)", f"{wall:.3f}", f"{cpu:.3f}",
                     "imports only"))
        rows.append(("imported by history --help", "", "", imported(["history", "--help"], repo)))
        rows.append(("imported by history --json", "", "", imported(["history", "--json"], repo)))
        if not a.no_gto:
            gto = shutil.which("gto") or str(Path(sys.executable).with_name("gto"))
            t = time.perf_counter()
            try:
                out = subprocess.run([gto, "history", "--json", "--ascending"], cwd=repo,
                                     check=True, capture_output=True, text=True,
                                     timeout=a.gto_timeout).stdout
                theirs = [(e["ref"], e["event"], e["version"]) for e in json.loads(out)]
                same = theirs == [(e["tag"], e["gto_event"], e["version"]) for e in ours]
                rows.append(("gto history --json (CLI, 1 run)", f"{time.perf_counter() - t:.3f}",
                             "", f"same events, same order: {'yes' if same else 'NO'}"))
            except subprocess.TimeoutExpired:
                rows.append(("gto history --json (CLI, 1 run)", f"> {a.gto_timeout:.0f}", "",
                             "timed out"))
        print_table(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
