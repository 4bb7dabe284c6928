"""``modelver diff``: what changed between two checkpoints or versions, tensor by tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from modelver.cli.output import console, echo_json, json_option, progress

if TYPE_CHECKING:
    from rich.console import Console

    from modelver.diff import CheckpointDiff, TensorDiff


@click.command("diff")
@click.argument("a")
@click.argument("b", required=False)
@json_option
@click.option(
    "--stat", is_flag=True, help="Counts and bytes per status from the manifests (no data read)."
)
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=40,
    show_default=True,
    help="Changed tensors to list (0: all).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress; print the summary line only.")
def diff(a: str, b: str | None, as_json: bool, stat: bool, top: int, quiet: bool) -> None:
    """Compare checkpoint B against A: params, metrics and every tensor.

    A and B are versions (NAME@vX.Y.Z, NAME, NAME#STAGE), commits, DVC experiments (a name
    as 'dvc exp show' lists it, or its refs/exps/... ref), or checkpoint directories (a step
    directory or a checkpoints root: its newest checkpoint). B defaults to the workspace's
    newest checkpoint. Metrics are the manifests' and, as FILE:NAME, the DVC metrics files
    of each side's commit. Tensors with equal hashes are 'unchanged' without being
    read; changed ones are streamed and get L2 distance, relative change (||a-b||/||a||),
    cosine similarity and max |a-b|.
    """
    from modelver import api

    with progress("diff", quiet=quiet or as_json) as on_progress:
        result = api.diff(a, b, stat=stat, progress=on_progress)
    if as_json:
        echo_json(result.to_json())
    elif quiet:
        click.echo(summary_line(result))
    else:
        _render(console(), result, top=top)


COMMANDS = [diff]


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def summary_line(result: CheckpointDiff) -> str:
    s = result.summary
    parts = []
    for status in ("changed", "added", "removed", "unchanged"):
        n = s.counts[status]
        parts.append(f"{n} {status}" + (f" ({human_bytes(s.nbytes[status])})" if n else ""))
    tail = "manifests only" if result.stat_only else f"{human_bytes(s.bytes_read)} read"
    return f"tensors: {', '.join(parts)}; {tail}"


def _num(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _shape(t: TensorDiff) -> str:
    def one(shape: tuple[int, ...]) -> str:
        return "×".join(map(str, shape)) or "scalar"

    if t.a and t.b and t.a.shape != t.b.shape:
        return f"{one(t.a.shape)} → {one(t.b.shape)}"
    entry = t.b or t.a
    return one(entry.shape) if entry else ""


def _dtype(t: TensorDiff) -> str:
    if t.a and t.b and t.a.dtype != t.b.dtype:
        return f"{t.a.dtype} → {t.b.dtype}"
    entry = t.b or t.a
    return entry.dtype if entry else ""


def _change_order(t: TensorDiff) -> tuple[int, float, str]:
    """Shape/dtype changes first, then the largest relative change."""
    if t.stats is None:
        return (0, 0.0, t.name)
    rel = t.stats.rel_change
    return (1, -(float("inf") if rel is None else rel), t.name)


def _render(out: Console, result: CheckpointDiff, *, top: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    a, b = result.a, result.b
    for key, end in (("A", a), ("B", b)):
        shown_path = end.path is not None and end.label != str(end.path)
        where = f"  [dim]{escape(str(end.path))}[/]" if shown_path else ""
        out.print(f"[bold]{key}[/] {escape(end.label)}  step {end.step}{where}", soft_wrap=True)
    if result.params:
        table = Table(title="params changed", title_justify="left")
        for col in ("param", "A", "B"):
            table.add_column(col)
        for p in result.params:
            old = "-" if p.status == "added" else repr(p.a)
            new = "-" if p.status == "removed" else repr(p.b)
            table.add_row(escape(p.key), escape(old), escape(new))
        out.print(table)
    if result.metrics:
        table = Table(title="metrics", title_justify="left")
        table.add_column("metric")
        for col in ("A", "B", "delta", "rel"):
            table.add_column(col, justify="right")
        for m in result.metrics:
            rel = None if m.rel_delta is None else 100 * m.rel_delta
            table.add_row(
                escape(m.name),
                escape(m.a_text) if m.a_text is not None else _num(m.a),
                escape(m.b_text) if m.b_text is not None else _num(m.b),
                _num(m.delta, "+.4g"),
                "-" if rel is None else f"{rel:+.2f}%",
            )
        out.print(table)
    out.print(summary_line(result), markup=False, highlight=False, soft_wrap=True)
    changed = sorted((t for t in result.tensors if t.status == "changed"), key=_change_order)
    if changed:
        table = Table(title="changed tensors", title_justify="left")
        table.add_column("tensor", overflow="fold")
        table.add_column("shape")
        table.add_column("dtype")
        if not result.stat_only:
            for col in ("rel change", "L2 diff", "cosine", "max |a-b|"):
                table.add_column(col, justify="right")
        shown = changed if top == 0 else changed[:top]
        for t in shown:
            row = [escape(t.name), _shape(t), _dtype(t)]
            if not result.stat_only:
                st = t.stats
                row += (
                    ["-"] * 4
                    if st is None
                    else [
                        _num(st.rel_change, ".3e"),
                        _num(st.l2, ".4g"),
                        _num(st.cosine, ".6f"),
                        _num(st.max_abs, ".4g"),
                    ]
                )
            table.add_row(*row)
        out.print(table)
        if len(shown) < len(changed):
            out.print(f"… {len(changed) - len(shown)} more changed tensors (--top 0 lists all)")
    for status in ("added", "removed"):
        names = [t for t in result.tensors if t.status == status]
        if names:
            out.print(f"[bold]{status}[/]:")
            for t in names:
                out.print(f"  {escape(t.name)}  {_shape(t)} {_dtype(t)}", highlight=False)
