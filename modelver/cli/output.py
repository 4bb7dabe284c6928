"""Terminal output shared by the commands: JSON, rich tables and progress on a TTY only."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console

quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print pure JSON on stdout.")


def console() -> Console:
    """Rich on stdout; plain text (no colour, no wrapping) when stdout is not a terminal."""
    tty = sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=not tty, force_terminal=tty or None)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@contextmanager
def progress(description: str, *, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A (done, total) callback drawing a bar on stderr when it is a TTY, else None."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        console=Console(stderr=True), transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
