"""Wall time of the demo pipeline's first `dvc repro` (dvc.yaml + examples/digits) in a fresh repo.

    python benchmarks/demo_repro.py [--rounds 1]

Each round copies the pipeline into a new Git + DVC repository in a temporary directory (own
HOME, so no user configuration), commits it and times one uninterrupted `dvc repro`: prepare,
train with checkpoints, evaluate. tests/test_demo_pipeline.py runs the same pipeline for its
results; the time is measured here (the test suite used to require under 120 s).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = [
    "dvc.yaml",
    "params.yaml",
    "examples/digits/common.py",
    "examples/digits/prepare.py",
    "examples/digits/train.py",
    "examples/digits/evaluate.py",
]


def environment(home: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@modelver.invalid",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@modelver.invalid",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(home / ".dvc-site"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": path,
    }


def make_repo(base: Path) -> tuple[Path, dict[str, str]]:
    """A fresh Git + DVC repository holding the demo pipeline, committed; and its environment."""
    repo, home = base / "repo", base / "home"
    home.mkdir(parents=True)
    for rel in PIPELINE_FILES:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    (repo / ".gitignore").write_text("__pycache__/\n")
    env = environment(home)
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["git", "init", "-q", "-b", "main"], [*dvc, "init", "-q"],
                 ["git", "add", "-A"], ["git", "commit", "-q", "-m", "demo pipeline"]):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)
    return repo, env


def one_round(base: Path) -> float:
    repo, env = make_repo(base)
    dvc = [sys.executable, "-m", "dvc"]
    started = time.perf_counter()
    subprocess.run([*dvc, "repro"], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    times = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="modelver-demo-") as tmp:
            times.append(one_round(Path(tmp)))
        print(f"round {i + 1}: dvc repro {times[-1]:.1f} s", flush=True)
    print(f"demo pipeline, first dvc repro: median {statistics.median(times):.1f} s "
          f"over {len(times)} round(s)")


if __name__ == "__main__":
    main()
