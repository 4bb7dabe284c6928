"""``modelver mlflow sync``: mirror model versions into an MLflow model registry."""

from __future__ import annotations

import click

from modelver.cli.output import console, echo_json, json_option, quiet_option


@click.group("mlflow")
def mlflow_group() -> None:
    """Mirror model versions into an MLflow model registry (needs the 'mlflow' extra)."""


@mlflow_group.command("sync")
@click.argument("name", required=False)
@click.option("--tracking-uri", metavar="URI",
              help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default).")
@click.option("--registry-uri", metavar="URI", help="Model registry URI (default: tracking URI).")
@json_option
@quiet_option
def mlflow_sync_cmd(
    name: str | None, tracking_uri: str | None, registry_uri: str | None, as_json: bool,
    quiet: bool,
) -> None:
    """Register every version (of NAME) with its lineage; stages become aliases. Idempotent."""
    from modelver import api

    res = api.mlflow_sync(name, tracking_uri=tracking_uri, registry_uri=registry_uri,
                          repo_root=".")
    if as_json:
        echo_json(res.to_json())
        return
    if quiet:
        return
    out = console()
    for v in res.versions:
        state = "created" if v.created else ("updated" if v.updated else "unchanged")
        aliases = f"  aliases: {', '.join(v.aliases)}" if v.aliases else ""
        out.print(f"{v.tag} -> {v.model} version {v.mlflow_version} ({state}){aliases}",
                  markup=False)
    for skipped in res.skipped:
        out.print(f"{skipped.tag} skipped: {skipped.reason}", markup=False)
    if not res.versions:
        out.print("no versions to sync", markup=False)


COMMANDS = [mlflow_group]
