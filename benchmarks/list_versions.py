"""Benchmark of `modelver list` over many versions, with `gto show` on the same repository.

Builds a Git repository with ``--versions`` commits, each carrying one annotated version tag
made the way ``modelver tag`` makes it (GTO name, metadata line), plus a stage assignment every
50 versions, in one ``git fast-import`` stream. Then times, ``--runs`` times each (medians):

- ``api.list_versions`` in-process (one ``git for-each-ref`` call);
- ``modelver list --json`` end to end (a fresh CLI process, what a user waits for);
- ``gto show --json`` (a fresh process), unless ``--no-gto``; it runs once with ``--gto-timeout``.

Target (issue 3): ``list`` over 1,000 versions under 2 s.

    python benchmarks/list_versions.py [--versions 1000] [--runs 3] [--no-gto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modelver import api
from modelver import versions as v

NAME = "bench-model"


def build_repo(root: Path, n: int) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@bench.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@bench.invalid"}
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True, env=env)
    out: list[bytes] = []

    def data(text: str) -> None:
        raw = text.encode()
        out.append(f"data {len(raw)}\n".encode() + raw + b"\n")

    t0 = 1_700_000_000
    parent = None
    for i in range(n):
        version = v.Semver(i // 100, i % 100, 0)
        out.append(f"commit refs/heads/main\nmark :{i + 1}\n".encode())
        out.append(f"committer bench <b@bench.invalid> {t0 + i} +0000\n".encode())
        data(f"train {i}")
        if parent:
            out.append(f"from {parent}\n".encode())
        out.append(b"M 644 inline step.txt\n")
        data(str(i * 100))
        parent = f":{i + 1}"
        meta = {"modelver": 1, "step": i * 100, "step_dir": f"step-{i * 100:08d}",
                "metrics": {"loss": 1.0 / (i + 1), "acc": i / n},
                "checkpoint": f"{i:032x}.dir", "path": "checkpoints", "stage": "train",
                "parent": str(v.Semver((i - 1) // 100, (i - 1) % 100, 0)) if i else None}
        for tag, summary, m in [(v.version_tag(NAME, version),
                                 f"Registering artifact {NAME} version {version}", meta)] + (
            [(v.stage_tag(NAME, "prod", i // 50 + 1),
              f"Assigning stage prod to artifact {NAME} version {version}",
              {"version": str(version)})] if i % 50 == 0 else []):
            out.append(f"tag {tag}\nfrom :{i + 1}\n".encode())
            out.append(f"tagger bench <b@bench.invalid> {t0 + i} +0000\n".encode())
            data(v.format_message(summary, m))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=root, input=b"".join(out),
                   check=True, env=env)


def timed(fn: object, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-gto", action="store_true")
    p.add_argument("--gto-timeout", type=float, default=120)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelver-bench-list-"))
    try:
        repo = tmp / "repo"
        t = time.perf_counter()
        build_repo(repo, a.versions)
        print(f"built {a.versions} versions in {time.perf_counter() - t:.1f} s: {repo}")
        exe = shutil.which("modelver") or str(Path(sys.executable).with_name("modelver"))
        rows: list[tuple[str, str, str]] = []

        sec, res = timed(lambda: api.list_versions(repo_root=repo), a.runs)
        assert isinstance(res, list) and len(res) == a.versions
        rows.append(("api.list_versions (in-process)", f"{sec:.3f}", f"{len(res)} versions"))

        def cli() -> list[object]:
            out = subprocess.run([exe, "list", "--json"], cwd=repo, check=True,
                                 capture_output=True, text=True).stdout
            return list(json.loads(out))

        sec, res = timed(cli, a.runs)
        assert isinstance(res, list) and len(res) == a.versions
        ok = "yes" if sec < 2.0 else "NO"
        rows.append(("modelver list --json (CLI)", f"{sec:.3f}", f"target < 2 s: {ok}"))

        if not a.no_gto:
            gto = shutil.which("gto") or str(Path(sys.executable).with_name("gto"))
            t = time.perf_counter()
            try:
                subprocess.run([gto, "show", "--json"], cwd=repo, check=True,
                               capture_output=True, timeout=a.gto_timeout)
                rows.append(("gto show --json (CLI, 1 run)", f"{time.perf_counter() - t:.3f}",
                             "same repository"))
            except subprocess.TimeoutExpired:
                rows.append(("gto show --json (CLI, 1 run)", f"> {a.gto_timeout:.0f}",
                             "timed out"))

        width = max(len(r[0]) for r in rows)
        print(f"\n{'command':<{width}}  {'seconds':>8}  note")
        for name, sec_s, note in rows:
            print(f"{name:<{width}}  {sec_s:>8}  {note}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
