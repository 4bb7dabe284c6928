"""``modelver check`` (the CI gate) and ``modelver mlflow sync``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from modelver.cli.output import console, echo_json, json_option, progress, quiet_option

if TYPE_CHECKING:
    from modelver.check import CheckReport


@click.command("check")
@click.argument("candidate")
@click.option("--baseline", "-b", required=True, metavar="REF",
              help="What the candidate must not be worse than, e.g. NAME#production.")
@click.option("--fail-if", "rules", multiple=True, metavar="EXPR",
              help="Fail when EXPR is true, e.g. \"accuracy < baseline.accuracy - 0.01\"; "
              "repeatable.")
@click.option("--model", metavar="MODULE:FACTORY",
              help="Callable returning the training state ({'model': ..., 'optimizer': ...}) "
              "to restore into; default: buffers shaped like the saved tensors.")
@click.option("--allow-nan", is_flag=True,
              help="Evaluate NaN/infinite metrics in rules (IEEE: NaN compares false) instead "
              "of failing the check; missing and non-numeric metrics still fail it.")
@click.option("--md", "md_file", type=click.Path(dir_okay=False, writable=True),
              help="Write a Markdown report (for a pull-request comment) to FILE.")
@json_option
@quiet_option
def check_cmd(
    candidate: str, baseline: str, rules: tuple[str, ...], model: str | None,
    allow_nan: bool, md_file: str | None, as_json: bool, quiet: bool,
) -> None:
    """Gate CANDIDATE against a baseline: metric rules, integrity, resumability.

    CANDIDATE and REF are versions (NAME@vX.Y.Z, NAME, NAME#STAGE), commits, checkpoint
    directories, or the word 'workspace' (the newest checkpoint in the working tree, with the
    metrics files there). Metrics are the DVC metrics files' (dvc.yaml 'metrics:') and the
    checkpoint manifest's (also as checkpoint.NAME). Rules use metric names, baseline.NAME,
    numbers, + - * /, comparisons, and/or/not, abs(x), min/max(x, y, ...); at most 1000
    characters. Exit 1 with the reason when a rule fires, reads a metric that is missing, not a
    number, NaN or infinite (see --allow-nan), or the checkpoint is corrupted or cannot be
    restored; exit 2 for a malformed rule.
    """
    from modelver import api
    from modelver.check import to_markdown
    from modelver.errors import CheckFailedError, ModelverError

    with progress("fetching candidate", quiet=quiet or as_json) as cb:
        report = api.check(candidate, baseline=baseline, rules=rules, model=model,
                           repo_root=".", progress=cb, allow_nan=allow_nan)
    if md_file:
        try:
            Path(md_file).write_text(to_markdown(report), encoding="utf-8")
        except OSError as e:
            raise ModelverError(f"cannot write --md {md_file}: {e.strerror or e}",
                                hint="give a writable path") from e
    if as_json:
        echo_json(report.to_json())
    elif not quiet:
        _render(report)
    if not report.passed:
        assert report.reason is not None
        raise CheckFailedError(report.reason, report=md_file)


def _render(report: CheckReport) -> None:
    from rich.table import Table

    from modelver.check import non_numeric_summary, resume_summary

    out = console()
    c, b = report.candidate, report.baseline
    out.print(f"candidate {c.label}" + (f" (step {c.step})" if c.step is not None else "")
              + f"  vs  baseline {b.label}" + (f" (step {b.step})" if b.step is not None else ""))
    table = Table(box=None, pad_edge=False)
    for col in ("metric", "baseline", "candidate", "delta", "rule", "result"):
        table.add_column(col, justify="right" if col in ("baseline", "candidate", "delta")
                         else "left")

    def num(x: float | None, fmt: str = ".6g") -> str:
        return "-" if x is None else format(x, fmt)

    for m in report.metrics:
        table.add_row(m.name, num(m.baseline), num(m.candidate), num(m.delta, "+.6g"),
                      "; ".join(m.rules), m.result)
    out.print(table, markup=False)
    i = report.integrity
    out.print("integrity: " + (f"ok ({i.files} files)" if i.ok else "; ".join(i.problems[:5])),
              markup=False)
    out.print(f"resumable: {report.resume.status}: {resume_summary(report.resume)}", markup=False)
    other = non_numeric_summary(report)
    if other:
        out.print(f"non-numeric metrics (not compared): {other}", markup=False)
    for r in report.rules:
        out.print(f"rule {r.status}: {r.rule}  ({r.detail})", markup=False)
    if report.passed:
        out.print("check passed", markup=False)


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


COMMANDS = [check_cmd, mlflow_group]
