"""Entry point: the click group, global flags and the one error handler."""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from modelver._version import __version__

# Each module defines click commands in a list named COMMANDS; imported lazily by the group so
# `modelver --help` stays fast (torch and dvc are imported by the commands that need them).
COMMAND_MODULES = (
    "modelver.cli.versions",
    "modelver.cli.data",
    "modelver.cli.diff",
    "modelver.cli.export",
    "modelver.cli.check",
    "modelver.cli.mlflow",
    "modelver.cli.recovery",
    "modelver.cli.report",
)


class ModelverGroup(click.Group):
    _loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod_name in COMMAND_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except ModuleNotFoundError as e:
                if e.name == mod_name:
                    continue
                raise
            for cmd in mod.COMMANDS:
                self.add_command(cmd)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

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
