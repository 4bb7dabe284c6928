"""``modelver report``: one self-contained HTML page of an artifact's versions."""

from __future__ import annotations

from pathlib import Path

import click

from modelver.cli.output import echo_json, json_option


@click.command("report")
@click.argument("name", required=False)
@click.option("--html", "html", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The page to write (replaced if it exists).")
@click.option("--a", "a", metavar="REF", help="Compare the layers of this version ...")
@click.option("--b", "b", metavar="REF", help="... with this one (default: the latest two).")
@json_option
def report(name: str | None, html: Path, a: str | None, b: str | None, as_json: bool) -> None:
    """Write an HTML page of NAME's versions: metrics across versions (stage assignments
    marked), the relative change ||b-a||/||a|| of every layer between two versions, and the
    lineage (parents, stages, deprecations). It needs no network to view: the chart library is
    inside the page. NAME may be left out when the repository has one artifact.
    """
    from modelver import api

    result = api.report(name, html=html, a=a, b=b)
    if as_json:
        echo_json(result.to_json())
        return
    vs = f", layers of {result.compared[1]} against {result.compared[0]}" if result.compared else ""
    click.echo(f"wrote {result.path} ({result.size / 1024:.0f} KiB): {result.versions} versions "
               f"of {result.name}, {result.events} events{vs}")


COMMANDS = [report]
