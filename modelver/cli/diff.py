"""``modelver diff``: what changed between two checkpoints or versions, tensor by tensor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from modelver.cli.output import console, echo_json, json_option, progress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from modelver.diff import CheckpointDiff, Endpoint, TensorDiff

PIVOT_KEYS = 4  # optimizer state with at most this many kinds (Adam: 3) gets a column per kind


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
    help="Changed tensors to list per component (0: all).",
)
@click.option("--wide", is_flag=True, help="Every column: dtype, L2 distance, max |a-b|.")
@click.option("--html", "html", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the relative change of every tensor as a chart to this page.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; print the summary line only.")
def diff(
    a: str, b: str | None, as_json: bool, stat: bool, top: int, wide: bool, html: Path | None,
    quiet: bool,
) -> None:
    """Compare checkpoint B against A: params, metrics and every tensor.

    A and B are versions (NAME@vX.Y.Z, NAME, NAME#STAGE), commits, DVC experiments (a name
    as 'dvc exp show' lists it, or its refs/exps/... ref), or checkpoint directories (a step
    directory or a checkpoints root: its newest checkpoint). B defaults to the workspace's
    newest checkpoint. Metrics are the manifests' and, as FILE:NAME, the DVC metrics files
    of each side's commit. Tensors with equal hashes are 'unchanged' without being
    read; changed ones are streamed and get relative change (||a-b||/||a||), cosine
    similarity and, with --wide, L2 distance and max |a-b|. Model tensors come first, then
    the other components, then optimizer state under the name of its parameter.
    """
    from modelver import api

    with progress("diff", quiet=quiet or as_json) as on_progress:
        result = api.diff(a, b, stat=stat, progress=on_progress)
    if html is not None:
        api.write_diff_html(result, html)
    if as_json:
        echo_json(result.to_json())
    elif quiet:
        click.echo(summary_line(result))
    else:
        _render(console(), result, top=top, wide=wide)
        if html is not None:
            click.echo(f"wrote {html}")


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


def _change_order(t: TensorDiff) -> tuple[int, float]:
    """Shape/dtype changes first, then the largest relative change (sorted stably, so ties
    keep the model's layout)."""
    if t.stats is None:
        return (0, 0.0)
    rel = t.stats.rel_change
    return (1, -(float("inf") if rel is None else rel))


def _side(end: Endpoint) -> str:
    """A version as the user named it, with what it resolved to: no scratch paths."""
    bits = [f"step {end.step}"]
    if end.version:
        bits.insert(0, end.version)
    if end.commit:
        bits.append(f"commit {end.commit[:10]}")
    return " · ".join(bits)


def _table(*columns: str, right: Sequence[str] = ()) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="right" if col in right else "left",
                         overflow="fold", no_wrap=i > 0)
    return table


def _rel(t: TensorDiff) -> str:
    if t.stats is None:
        return "shape" if t.a and t.b and t.a.shape != t.b.shape else t.status
    return _num(t.stats.rel_change, ".3g")


def _stat_cells(t: TensorDiff, *, wide: bool) -> list[str]:
    st = t.stats
    if not wide:
        return [_rel(t), "-" if st is None else _num(st.cosine, ".6f")]
    if st is None:
        return [_rel(t), "-", "-", "-"]
    return [_rel(t), _num(st.cosine, ".6f"), _num(st.l2, ".4g"), _num(st.max_abs, ".4g")]


def _stat_columns(*, stat_only: bool, wide: bool) -> list[str]:
    if stat_only:
        return []
    return ["rel change", "cosine", *(["L2 diff", "max |a-b|"] if wide else [])]


def _component_table(ts: list[TensorDiff], *, stat_only: bool, wide: bool) -> Table:
    """A module's (or other component's) changed tensors: name, shape, how far they moved.
    Names come from the checkpoint: escaped, never rich markup."""
    from rich.markup import escape

    dtype = wide or any(t.a and t.b and t.a.dtype != t.b.dtype for t in ts)
    stats = _stat_columns(stat_only=stat_only, wide=wide)
    table = _table("tensor", "shape", *(["dtype"] if dtype else []), *stats, right=stats)
    for t in ts:
        row = [escape(t.place.key if t.place else t.name), _shape(t)]
        row += [_dtype(t)] if dtype else []
        table.add_row(*row, *([] if stat_only else _stat_cells(t, wide=wide)))
    return table


def _optimizer_table(ts: list[TensorDiff], *, stat_only: bool, wide: bool) -> Table:
    """Optimizer state keyed by parameter: one row a parameter and a column per kind of state
    (Adam: exp_avg, exp_avg_sq, step), each cell its relative change; or, with many kinds or
    --wide, one row per tensor."""
    from rich.markup import escape

    kinds = list(dict.fromkeys(t.place.key for t in ts if t.place and t.place.param))
    if wide or len(kinds) > PIVOT_KEYS or any(t.place is None or t.place.param is None
                                              for t in ts):
        stats = _stat_columns(stat_only=stat_only, wide=wide)
        table = _table("parameter", "state", "shape", *(["dtype"] if wide else []), *stats,
                       right=stats)
        for t in ts:
            param, key = (t.place.param, t.place.key) if t.place else (None, t.name)
            row = [escape(param or "-"), escape(key), _shape(t), *([_dtype(t)] if wide else [])]
            table.add_row(*row, *([] if stat_only else _stat_cells(t, wide=wide)))
        return table
    rows: dict[str, dict[str, str]] = {}
    for t in ts:
        assert t.place is not None and t.place.param is not None
        rows.setdefault(t.place.param, {})[t.place.key] = _rel(t)
    columns = [escape(k) for k in kinds]
    table = _table("parameter", *columns, right=columns)
    for param, cells in rows.items():
        table.add_row(escape(param), *(cells.get(k, "same") for k in kinds))
    return table


def _render(out: Console, result: CheckpointDiff, *, top: int, wide: bool) -> None:
    from rich.markup import escape

    for key, end in (("A", result.a), ("B", result.b)):
        out.print(f"[bold]{key}[/] {escape(end.label)}  [dim]{escape(_side(end))}[/]",
                  soft_wrap=True)
    if result.params:
        table = _table("param changed", "A", "B")
        for p in result.params:
            old = "-" if p.status == "added" else repr(p.a)
            new = "-" if p.status == "removed" else repr(p.b)
            table.add_row(escape(p.key), escape(old), escape(new))
        out.print(table)
    if result.metrics:
        table = _table("metric", "A", "B", "delta", "rel", right=("A", "B", "delta", "rel"))
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
    sections: dict[str, list[TensorDiff]] = {}
    for t in result.tensors:
        sections.setdefault(t.place.component if t.place else "", []).append(t)
    for comp, ts in sections.items():
        changed = [t for t in ts if t.status == "changed"]
        if not changed:
            continue
        optimizer = ts[0].place is not None and ts[0].place.role == "optimizer"
        if optimizer:  # whole parameters are listed, so cut by parameter, not by tensor
            order = [t.place.param if t.place else t.name for t in changed]
            keep = set(list(dict.fromkeys(order))[:top]) if top else None
            shown = [t for t, p in zip(changed, order, strict=True) if keep is None or p in keep]
            table = _optimizer_table(shown, stat_only=result.stat_only, wide=wide)
        else:
            changed.sort(key=_change_order)
            shown = changed if top == 0 else changed[:top]
            table = _component_table(shown, stat_only=result.stat_only, wide=wide)
        heading = f"[bold]{escape(comp)}[/]: {len(changed)} of {len(ts)} tensors changed"
        out.print()
        out.print(heading + (" (optimizer state, by parameter)" if optimizer else ""))
        out.print(table)
        if optimizer and any(t.place and (t.place.param or "").startswith("#") for t in shown):
            out.print("[dim]#N: a parameter whose name was not recorded at save (a checkpoint "
                      "from before modelver recorded them, or one of no module saved)[/]")
        if len(shown) < len(changed):
            out.print(f"… {len(changed) - len(shown)} more changed tensors in {escape(comp)} "
                      "(--top 0 lists all)")
    for status in ("added", "removed"):
        names = [t for t in result.tensors if t.status == status]
        if names:
            out.print(f"[bold]{status}[/]:")
            for t in names:
                out.print(f"  {escape(t.name)}  {_shape(t)} {_dtype(t)}", highlight=False)
