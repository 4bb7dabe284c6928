"""Data commands: checkout, push, pull, verify."""

from __future__ import annotations

import click

from modelver import api
from modelver.cli.output import console, echo_json, json_option, progress, quiet_option


@click.command("checkout")
@click.argument("ref")
@click.option("--to", "to", type=click.Path(file_okay=False),
              help="Write the checkpoint to DIR/<step dir> instead of the workspace path.")
@click.option("--force", is_flag=True,
              help="Replace checkpoints that are not in the DVC cache (they are lost).")
@quiet_option
def checkout_cmd(ref: str, to: str | None, force: bool, quiet: bool) -> None:
    """Materialise a version's checkpoint from the cache (else the remote), verified."""
    with progress("checking out", quiet=quiet) as cb:
        res = api.checkout(ref, to=to, force=force, repo_root=".", progress=cb)
    if not quiet:
        # name what was checked: the checkpoint (and its delta bases), or every step directory
        # of the output; nothing else is called verified
        what = ", ".join(res.verified) if res.verified else "nothing"
        console().print(f"{res.ref.tag or res.ref.ref}: step {res.step} in {res.path} "
                        f"(verified: {what})")


@click.command("push")
@click.argument("refs", nargs=-1)
@json_option
@quiet_option
def push_cmd(refs: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Send versions' data to the storage remote (DVC remote; origin with Git LFS) and their
    tags to 'origin' (all versions when no REF)."""
    with progress("pushing", quiet=quiet or as_json) as cb:
        res = api.push(refs, repo_root=".", progress=cb)
    if as_json:
        echo_json({"refs": res.refs, "objects": res.objects, "tags": res.tags})
    elif not quiet:
        console().print(
            f"pushed {len(res.refs)} version(s): {res.objects} new object(s)"
            + (f", {len(res.tags)} tag(s) to origin" if res.tags else "")
        )


@click.command("pull")
@click.argument("ref")
@json_option
@quiet_option
def pull_cmd(ref: str, as_json: bool, quiet: bool) -> None:
    """Fetch tags from 'origin' and a version's data into the local cache (DVC or Git LFS)."""
    with progress("pulling", quiet=quiet or as_json) as cb:
        res = api.pull(ref, repo_root=".", progress=cb)
    if as_json:
        echo_json({"refs": res.refs, "objects": res.objects, "tags": res.tags})
    elif not quiet:
        console().print(
            f"pulled {res.refs[0]}: {res.objects} object(s) into the cache"
            + (f", {len(res.tags)} new tag(s)" if res.tags else "")
            + "; 'modelver checkout' puts it in the workspace"
        )


@click.command("verify")
@click.argument("target", required=False, metavar="[REF|PATH]")
@json_option
@quiet_option
@click.pass_context
def verify_cmd(ctx: click.Context, target: str | None, as_json: bool, quiet: bool) -> None:
    """Check checkpoints byte for byte; exit 1 on any mismatch."""
    res = api.verify(target, repo_root=".")
    if as_json:
        echo_json({
            "ok": res.ok,
            "checkpoints": [
                {"path": str(c.path), "step": c.step, "ok": not c.problems, "problems": c.problems}
                for c in res.checked
            ],
        })
    elif not quiet:
        out = console()
        for c in res.checked:
            if c.problems:
                out.print(f"[red]CORRUPT[/red] {c.path}: " + "; ".join(c.problems))
            else:
                out.print(f"[green]ok[/green]      {c.path}")
    if not res.ok:
        if not as_json:
            bad = sum(1 for c in res.checked if c.problems)
            click.secho(
                f"error: {bad} of {len(res.checked)} checkpoint(s) failed verification "
                "(modelver verify; hint: pull the version again, or checkout --force)",
                fg="red", err=True,
            )
        ctx.exit(1)


COMMANDS = [checkout_cmd, push_cmd, pull_cmd, verify_cmd]
