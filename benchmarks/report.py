"""Benchmark of `modelver report --html` over many versions.

Builds the repository of ``benchmarks/list_versions.py`` (``--versions`` commits, each with a
version tag carrying two metrics, a stage assignment every 50 versions, one ``git
fast-import``), and two checkpoints of a small MLP (``--layers`` linear layers, AdamW state)
outside Git, which the report's layer chart compares (``--a``/``--b`` take directories too:
the fast-imported versions have no checkpoint data). Times ``modelver report NAME --html``
end to end in a fresh CLI process, ``--runs`` times (median), and checks the page holds all
three charts.

Target (issue 16): ``report`` over 1,000 versions under 3 s.

    python benchmarks/report.py [--versions 1000] [--runs 5] [--layers 8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from list_versions import NAME, build_repo  # the same repository


def checkpoints(root: Path, layers: int) -> tuple[Path, Path]:
    import torch

    from modelver import CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(layers)))
    opt = torch.optim.AdamW(model.parameters())
    mgr = CheckpointManager(root, keep_last=None)
    for step in (1, 2):
        opt.zero_grad()
        model(torch.randn(32, 256)).square().mean().backward()
        opt.step()
        mgr.save(step, {"model": model, "optimizer": opt})
    mgr.close()
    return root / "step-00000001", root / "step-00000002"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="modelver-bench-report-"))
    try:
        repo = tmp / "repo"
        t = time.perf_counter()
        build_repo(repo, a.versions)
        ca, cb = checkpoints(tmp / "ckpt", a.layers)
        print(f"built {a.versions} versions and 2 checkpoints in "
              f"{time.perf_counter() - t:.1f} s: {repo}")
        exe = shutil.which("modelver") or str(Path(sys.executable).with_name("modelver"))
        page = tmp / "report.html"
        cmd = [exe, "report", NAME, "--html", str(page), "--a", str(ca), "--b", str(cb)]
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        text = page.read_text()
        assert text.count('data-chart="') == 3, "a chart is missing"
        sec = statistics.median(times)
        print(f"\nmodelver report --html (CLI), {a.versions} versions: median {sec:.3f} s of "
              f"{a.runs} runs ({min(times):.3f}-{max(times):.3f} s), page "
              f"{page.stat().st_size / 1024:.0f} KiB; target < 3 s: {'yes' if sec < 3 else 'NO'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
