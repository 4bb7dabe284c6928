"""Entry point: the click group, global flags and the one error handler."""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from modelver._version import __version__

# The module that defines each command (in its list COMMANDS). `modelver CMD` imports that one
# module alone, so a command pays for no other's imports (torch, dvc, GitPython); `modelver
# --help` imports them all, for every command's line of help.
COMMAND_MODULES = {
    **dict.fromkeys(("init", "tag", "promote", "deprecate", "unassign", "history", "list",
                     "show", "resume"), "modelver.cli.versions"),
    **dict.fromkeys(("checkout", "push", "pull", "verify"), "modelver.cli.data"),
    "diff": "modelver.cli.diff",
    "export": "modelver.cli.export",
    "check": "modelver.cli.check",
    "mlflow": "modelver.cli.mlflow",
    "recover": "modelver.cli.recovery",
    "report": "modelver.cli.report",
}


class ModelverGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        mod_name = COMMAND_MODULES.get(cmd_name)
        if mod_name is None:
            return None
        commands = importlib.import_module(mod_name).COMMANDS
        return {c.name: c for c in commands}[cmd_name]

    def invoke(self, ctx: click.Context) -> Any:
        from modelver.errors import ModelverError

        try:
            return super().invoke(ctx)
        except ModelverError as e:
            if os.environ.get("MODELVER_DEBUG"):
                raise
            # every line names the command that was run: a script running several sees which
            cmd = f"modelver {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "modelver"
            line = f"error: {e.message} ({cmd}" + (f"; hint: {e.hint})" if e.hint else ")")
            click.secho(line, fg="red", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=ModelverGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="modelver")
def cli() -> None:
    """Exact, crash-safe checkpoints and model versions on Git + DVC.

    Set MODELVER_DEBUG=1 to see tracebacks for errors.
    """


def main() -> None:
    cli(prog_name="modelver")


if __name__ == "__main__":  # pragma: no cover
    main()
