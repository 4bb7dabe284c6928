"""Run the real ``modelver`` CLI and SIGKILL this process at one point of a directory swap.

``python tests/kill_swap.py POINT [--no-exchange] -- ARGS...`` instruments
``modelver.checkpoint.commit`` from outside (production code has no test hooks) and then calls
``modelver.cli.main:main`` with ARGS:

- ``swap``: just before the atomic exchange of the new tree with the old one;
- ``swapped``: just after the exchange (the old tree now sits under the side name);
- ``between``: after the first of the two fallback renames (``dest`` moved aside);
- ``none``: no kill (with ``--no-exchange`` only forces the two-rename fallback).

``--no-exchange`` makes the exchange report "unsupported", as on a file system or kernel
without ``renameat2(RENAME_EXCHANGE)``, so the two-rename path runs.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import modelver.checkpoint.commit as commit
from modelver.cli.main import main

POINTS = ("swap", "swapped", "between", "none")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def instrument(point: str, *, no_exchange: bool) -> None:
    real_exchange = commit._exchange
    real_rename = os.rename

    def exchange(a: Path, b: Path) -> bool:
        if point == "swap":
            _die()
        done = False if no_exchange else real_exchange(a, b)
        if done and point == "swapped":
            _die()
        return done

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_rename(src, dst, *args, **kwargs)
        if point == "between" and ".modelver-old-" in os.path.basename(os.fspath(dst)):
            _die()  # the old tree is aside, the new one not yet in place

    commit._exchange = exchange
    os.rename = rename


if __name__ == "__main__":
    argv = sys.argv[1:]
    point = argv.pop(0)
    if point not in POINTS:
        raise SystemExit(f"point must be one of {POINTS}")
    no_exchange = "--no-exchange" in argv[: argv.index("--")]
    args = argv[argv.index("--") + 1 :]
    instrument(point, no_exchange=no_exchange)
    sys.argv = ["modelver", *args]
    main()
