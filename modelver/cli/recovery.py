"""recover: continue an interrupted run on a fresh clone from the checkpoints it pushed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.markup import escape

from modelver import api
from modelver.cli.output import (
    console,
    echo_json,
    format_metrics,
    json_option,
    progress,
    quiet_option,
)

if TYPE_CHECKING:
    from modelver.api.recovery import ListedRun


@click.command("recover")
@click.option("-r", "--remote", help="DVC remote name or URL (default: the default remote).")
@click.option("--run", "run_id", metavar="ID", help="Recover this run (see --list).")
@click.option("--list", "list_only", is_flag=True,
              help="List the runs of this repository that pushed checkpoints: checked ones "
              "(listing and manifest read from the remote) newest first, then the rest.")
@click.option("--repro", is_flag=True, help="Run 'dvc repro' right after restoring.")
@json_option
@quiet_option
def recover_cmd(remote: str | None, run_id: str | None, list_only: bool, repro: bool,
                as_json: bool, quiet: bool) -> None:
    """Restore the newest checkpoint an interrupted run of this branch pushed (from
    CheckpointManager(push=True)) into its checkpoints directory, verified; then
    'dvc repro' continues training from it."""
    if list_only:
        runs = api.list_runs(remote=remote, repo_root=".")
        if as_json:
            echo_json([r.to_json() for r in runs])
        elif not quiet:
            out = console()
            for r in runs:  # records are data others wrote: printed as text, not markup
                out.print(escape(_listed(r)))
        return
    with progress("recovering", quiet=quiet or as_json) as cb:
        res = api.recover(remote=remote, run=run_id, repro=repro, quiet=quiet or as_json,
                          repo_root=".", progress=cb)
    if as_json:
        echo_json(res.to_json())
    elif not quiet:
        then = "" if repro else "; run 'dvc repro' to continue training"
        console().print(escape(
            f"recovered run {res.run.run} (branch {res.run.branch or '-'}): step {res.run.step} "
            f"in {res.path} (verified, {res.objects} object(s) from '{res.remote}'){then}"
        ))


def _listed(r: ListedRun) -> str:
    """One run: its checked step, or the step it only claims and why it is not believed."""
    rec = r.record
    if rec is None:
        return f"{r.run}  refused: {r.reason}"
    if r.status == "checked":
        metrics = format_metrics(r.metrics)
        step = f"step {r.step} (checked)" + (f"  {metrics}" if metrics else "")
    else:
        step = f"claimed step {rec.step} ({r.status}: {r.reason})"
    return f"{rec.run}  {rec.branch or '-'}  {step}  pushed {rec.pushed}  {rec.host}"


COMMANDS = [recover_cmd]
