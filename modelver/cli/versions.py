"""Registry commands: init, tag, promote, deprecate, unassign, history, list, show, resume."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from modelver import api
from modelver.cli.output import (
    console,
    echo_json,
    format_metrics,
    json_option,
    progress,
    quiet_option,
)
from modelver.errors import ModelverError


@click.command("init")
@click.option("--remote", metavar="URL", help="DVC remote URL (default: a local directory).")
@click.option("--backend", type=click.Choice(list(api.BACKENDS)), default="dvc", show_default=True,
              help="Where checkpoint data is stored: DVC, or Git LFS in the Git remote.")
@click.option("--artifact", metavar="NAME=PATH", default="model=checkpoints", show_default=True,
              help="With --backend lfs and no artifacts in dvc.yaml: declared in modelver.yaml.")
@quiet_option
def init_cmd(remote: str | None, backend: str, artifact: str, quiet: bool) -> None:
    """Prepare this Git repository: DVC, a default remote, a linking cache (or Git LFS)."""
    name, sep, path = artifact.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter("expected NAME=PATH", param_hint="'--artifact'")
    res = api.init(".", remote=remote, backend=backend, artifact=(name, path.rstrip("/")))
    if quiet:
        return
    out = console()
    for line in res.notes:
        out.print(line)


@click.command("tag")
@click.argument("ref", metavar="NAME@vX.Y.Z|NAME")
@click.argument("rev", default="HEAD")
@click.option("--bump", type=click.Choice(["major", "minor", "patch"]),
              help="Next version after NAME's latest.")
@click.option("-m", "--message", help="Tag message (metadata is appended).")
@json_option
@quiet_option
def tag_cmd(
    ref: str, rev: str, bump: str | None, message: str | None, as_json: bool, quiet: bool
) -> None:
    """Register a model version at REV (default HEAD) as a GTO tag. REV is a commit, branch
    or tag, or a DVC experiment: its name as 'dvc exp show' lists it, or its refs/exps/... ref."""
    if bump and "@" in ref:
        raise click.UsageError("give either NAME@vX.Y.Z or NAME --bump, not both")
    res = api.tag(ref, rev=rev, bump=bump, message=message, repo_root=".")
    if as_json:
        echo_json({
            "tag": res.tag, "name": res.name, "version": res.version, "commit": res.commit,
            "step": res.step, "metrics": res.metrics, "checkpoint_hash": res.checkpoint_hash,
            "parent": res.parent,
        })
    elif not quiet:
        console().print(
            f"created {res.tag} at {res.commit[:10]}: step {res.step}"
            + (f", {format_metrics(res.metrics)}" if res.metrics else "")
        )


@click.command("promote")
@click.argument("ref", metavar="NAME@vX.Y.Z")
@click.argument("stage")
@quiet_option
def promote_cmd(ref: str, stage: str, quiet: bool) -> None:
    """Assign a version to a stage (GTO NAME#STAGE#N tag)."""
    res = api.promote(ref, stage, repo_root=".")
    if quiet:
        return
    if res.tag is None:
        console().print(f"{res.name}@{res.version} already is in stage '{stage}'")
    else:
        console().print(f"created {res.tag}: {res.name}@{res.version} is in stage '{stage}'")


@click.command("deprecate")
@click.argument("ref", metavar="NAME@vX.Y.Z|NAME")
@click.option("-m", "--message", help="Tag message (why).")
@quiet_option
def deprecate_cmd(ref: str, message: str | None, quiet: bool) -> None:
    """Deprecate a version (GTO NAME@vX.Y.Z! tag) or a whole artifact (NAME@deprecated):
    'list' hides it, its stages stop counting. A new version revives a deprecated artifact."""
    res = api.deprecate(ref, message=message, repo_root=".")
    if not quiet:
        what = f"{res.name}@{res.version}" if res.version else f"artifact {res.name}"
        console().print(f"created {escape(res.tag)}: {escape(what)} is deprecated")


@click.command("unassign")
@click.argument("ref", metavar="NAME|NAME@vX.Y.Z")
@click.argument("stage")
@click.option("-m", "--message", help="Tag message (why).")
@quiet_option
def unassign_cmd(ref: str, stage: str, message: str | None, quiet: bool) -> None:
    """Take STAGE from its current version (NAME) or from a version (GTO NAME#STAGE!#N tag).
    An older assignment of STAGE still in effect becomes its version again, as in gto."""
    res = api.unassign(ref, stage, message=message, repo_root=".")
    if not quiet:
        now = f"{res.name}@{res.current}" if res.current else "no version"
        console().print(f"created {escape(res.tag)}: {escape(res.name)}@{res.version} left "
                        f"stage '{escape(stage)}' (now {escape(now)})")


@click.command("history")
@click.argument("name", required=False)
@json_option
def history_cmd(name: str | None, as_json: bool) -> None:
    """Registrations, stage assignments, unassignments and deprecations, oldest first (the
    events 'gto history' lists, read from the same tags)."""
    events = api.history(name, repo_root=".")
    if as_json:
        echo_json([e.to_json() for e in events])
        return
    out = console()
    if not events:
        out.print("no registry events yet (create one with 'modelver tag NAME@v0.1.0')")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("time (UTC)", "event", "version", "stage", "commit"):
        table.add_column(col)
    for e in events:  # tag names and stages are data others wrote: never rich markup
        what = f"{e.artifact}@{e.version}" if e.version else e.artifact
        table.add_row(e.created[:19].replace("T", " "), e.kind, escape(what),
                      escape(e.stage or ""), e.commit[:7])
    out.print(table)


@click.command("list")
@click.argument("name", required=False)
@click.option("-d", "--deprecated", is_flag=True,
              help="Include deprecated versions and artifacts (as gto show --deprecated).")
@json_option
def list_cmd(name: str | None, deprecated: bool, as_json: bool) -> None:
    """Versions with stages, commit, date, step and metrics (--json: also the DVC metrics
    files of each version's commit); a tag whose metadata is refused is listed as invalid
    (with the reason) and cannot be used. Deprecated versions are hidden unless -d."""
    rows = api.list_versions(name, repo_root=".", dvc_metrics=as_json, deprecated=deprecated)
    if as_json:
        echo_json([r.to_json() for r in rows])
        return
    out = console()
    if not rows:
        hidden = "" if deprecated else "; 'modelver list --deprecated' shows deprecated ones"
        out.print(f"no versions (create one with 'modelver tag NAME@v0.1.0'{hidden})")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("name", "version", "stages", "commit", "date", "step", "metrics"):
        # the metrics wrap on a narrow terminal; a date or a commit cut in two reads wrong
        table.add_column(col, justify="right" if col == "step" else "left",
                         no_wrap=col in ("version", "commit", "date", "step"))
    for r in rows:  # tag text is data others wrote: never rich markup
        table.add_row(
            escape(r.name), (r.version or "") + (" [red](invalid)[/red]" if r.invalid else "")
            + (" (deprecated)" if r.deprecated else ""),
            escape(",".join(r.stages)), r.commit[:10], escape(r.date[:19].replace("T", " ")),
            "" if r.step is None else str(r.step),
            f"[red]invalid: {escape(r.invalid)}[/red]" if r.invalid
            else escape(format_metrics(r.metrics)),
        )
    out.print(table)


@click.command("show")
@click.argument("ref")
@json_option
def show_cmd(ref: str, as_json: bool) -> None:
    """One version (or commit, or DVC experiment): metadata, manifest and DVC metrics, params,
    files, and whether its data is local / in the remote."""
    d = api.show(ref, repo_root=".")
    if as_json:
        echo_json(d.to_json())
        return
    i = d.info
    out = console()
    yes_no = {True: "yes", False: "no", None: "unknown"}
    fields: list[tuple[str, Any]] = [
        ("version", i.tag or "- (no version tagged at this commit)"),
        ("deprecated", f"yes, by {i.deprecated}" if i.deprecated else "no"),
        ("commit", i.commit),
        ("date", i.date),
        ("stages", ", ".join(i.stages) or "-"), ("parent", i.parent or "-"),
        ("step", i.step), ("checkpoint", f"{d.path}/{d.step_dir or '?'}  ({i.checkpoint_hash})"),
        ("run", d.run or "-"),
        ("metrics", format_metrics(i.metrics) or "-"),
        ("in cache", yes_no[d.in_cache]), ("in remote", yes_no[d.in_remote]),
        ("message", i.message),
    ]
    for k, val in fields:  # values are data others wrote (tag messages): never rich markup
        out.print(f"[bold]{k:>10}[/bold]  {escape(str(val))}")
    if i.dvc_metrics or i.dvc_metrics_error:
        out.print("[bold]dvc metrics[/bold]")
        for file, values in (i.dvc_metrics or {}).items():
            shown = ", ".join(f"{k}={_value(x)}" for k, x in sorted(values.items()))
            out.print(f"            {escape(file)}: {escape(shown or '-')}")
        if i.dvc_metrics_error:
            out.print(f"            [red]unreadable: {escape(i.dvc_metrics_error)}[/red]")
    if d.params:
        out.print("[bold]    params[/bold]")
        for file, values in d.params.items():  # dvc.lock keys params by file
            where = "" if file == "params.yaml" else f"  ({file})"
            for line in _flatten(values):
                out.print(f"            {escape(line)}{escape(where)}")
    if d.files:
        table = Table(box=None, pad_edge=False, title=None)
        table.add_column("file")
        table.add_column("size", justify="right")
        table.add_column("md5")
        for f in d.files:
            table.add_row(escape(f.path), "" if f.size is None else str(f.size), f.md5)
        out.print(table)


def _value(x: float | str) -> str:
    """A metric number as ``format_metrics`` shows it; a non-numeric one as its text."""
    return x if isinstance(x, str) else f"{x:.4g}"


def _flatten(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict) and d:
        lines = []
        for k, val in d.items():
            lines += _flatten(val, f"{prefix}.{k}" if prefix else str(k))
        return lines
    return [f"{prefix} = {d}"]


@click.command("resume")
@click.argument("ref")
@click.option("-S", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a param in params.yaml (dotted key); repeatable.")
@click.option("--worktree", type=click.Path(file_okay=False),
              help="Resume in a new Git worktree at DIR instead of this one.")
@click.option("--no-repro", is_flag=True, help="Prepare the branch but do not run 'dvc repro'.")
@quiet_option
def resume_cmd(
    ref: str, overrides: tuple[str, ...], worktree: str | None, no_repro: bool, quiet: bool
) -> None:
    """Continue training from a version: new branch, its checkpoint, param overrides, dvc repro."""
    try:
        values = dict(api.parse_override(o) for o in overrides)
    except ModelverError as e:
        raise click.BadParameter(e.message, param_hint="'-S'") from e
    with progress("restoring checkpoint", quiet=quiet) as cb:
        res = api.resume(
            ref, overrides=values, worktree=worktree, repro=not no_repro, quiet=quiet,
            repo_root=".", progress=cb,
        )
    if not quiet:
        where = f" in {res.workdir}" if worktree else ""
        console().print(
            f"branch {res.branch}{where}: restored step {res.step}"
            + (" and ran dvc repro" if res.reproduced else "; run 'dvc repro' to continue")
        )


COMMANDS = [init_cmd, tag_cmd, promote_cmd, deprecate_cmd, unassign_cmd, history_cmd, list_cmd,
            show_cmd, resume_cmd]
