"""What the framework save benchmarks share: bytes of a checkpoint, and their results table."""

from __future__ import annotations

from pathlib import Path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def print_saves(results: dict[str, tuple[float, int]], *, base: str) -> None:
    """One line per method: median blocked seconds and bytes, each as a ratio to ``base``."""
    base_s, base_b = results[base]
    width = max(map(len, results)) + 2
    print(f"{'':{width}} {'blocked s':>10} {'x ' + base:>{len(base) + 2}} {'MiB on disk':>12} "
          f"{'x':>6}")
    for name, (s, b) in results.items():
        print(f"{name:{width}} {s:10.3f} {s / base_s:{len(base) + 2}.2f} "
              f"{b / (1 << 20):12.1f} {b / base_b:6.2f}")
