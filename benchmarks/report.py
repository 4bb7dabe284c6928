"""Benchmark of `modelver report --html` over many versions.

Builds the repository of ``benchmarks/list_versions.py`` (``--versions`` commits, each with a
version tag carrying two metrics, a stage assignment every 50 versions, one ``git
fast-import``), and two checkpoints of a small MLP (``--layers`` linear layers, AdamW state)
outside Git, which the report's layer chart compares (``--a``/``--b`` take directories too:
the fast-imported versions have no checkpoint data). Times, ``--runs`` times each (medians of
wall and CPU seconds, a fresh CLI process each), ``modelver report NAME --html`` end to end
and ``modelver report --help`` (the start-up alone); checks the page holds all three charts,
and lists which of torch, GitPython, dvc and numpy each imports (``-X importtime``).

Target (issue 16): ``report`` over 1,000 versions under 3 s.

    python benchmarks/report.py [--versions 1000] [--runs 5] [--layers 8]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from history import cli_seconds, imported, print_table
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
        args = ["report", NAME, "--html", str(page), "--a", str(ca), "--b", str(cb)]
        rows = []
        wall, cpu, _ = cli_seconds([exe, *args], repo, a.runs)
        text = page.read_text()
        assert text.count('data-chart="') == 3, "a chart is missing"
        rows.append((f"modelver report --html (CLI), {a.versions} versions", f"{wall:.3f}",
                     f"{cpu:.3f}", f"target < 3 s: {'yes' if wall < 3 else 'NO'}; page "
                     f"{page.stat().st_size / 1024:.0f} KiB"))
        wall, cpu, _ = cli_seconds([exe, "report", "--help"], repo, a.runs)
        rows.append(("modelver report --help (start-up)", f"{wall:.3f}", f"{cpu:.3f}",
                     "imports only"))
        rows.append(("imported by report --help", "", "", imported(["report", "--help"], repo)))
        rows.append(("imported by one report run", "", "", imported(args, repo)))
        print_table(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
