"""``modelver check`` (the CI gate) and its renderings: the terminal summary and the Markdown
report for a pull-request comment."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from modelver.cli.output import console, echo_json, json_option, progress, quiet_option
from modelver.errors import clip

if TYPE_CHECKING:
    from modelver.check import CheckReport, Resumability, Side


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


# --- the pull-request report ----------------------------------------------------------------

_MARK = {"pass": "✅ pass", "fail": "❌ fail", "error": "⚠️ error", "": ""}
_RESUME_MARK = {"ok": "✅", "failed": "❌", "skipped": "⏭️"}


def _num(x: float | None, *, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.6g}" if signed else f"{x:.6g}"


def _where(s: Side) -> str:
    bits = [f"`{s.label}`"]
    if s.commit:
        bits.append(f"commit `{s.commit[:10]}`")
    if s.step is not None:
        bits.append(f"step {s.step}")
    return ", ".join(bits)


def to_markdown(report: CheckReport) -> str:
    """A Markdown report for a pull-request comment: verdict, metric table, checks, rules."""
    verdict = "✅ passed" if report.passed else "❌ failed"
    lines = [
        f"### modelver check: {verdict}",
        "",
        f"Candidate {_where(report.candidate)} vs baseline {_where(report.baseline)}.",
        "",
        "| metric | baseline | candidate | delta | rule | result |",
        "|---|---:|---:|---:|---|---|",
    ]
    for m in report.metrics:
        rules = "<br>".join(f"`{r}`" for r in m.rules)
        lines.append(f"| {_md_escape(m.name)} | {_num(m.baseline)} | {_num(m.candidate)} | "
                     f"{_num(m.delta, signed=True)} | {rules} | {_MARK[m.result]} |")
    if not report.metrics:
        lines.append("| (no metrics) | | | | | |")
    other = non_numeric_summary(report)
    if other:
        lines += ["", f"**Non-numeric metrics (not compared):** {_md_escape(other)}"]
    i, r = report.integrity, report.resume
    lock = " and the md5s `dvc.lock` pins" if i.against_lock else ""
    lines += [
        "",
        "**Integrity:** " + (f"✅ {i.files} files match their manifest hashes{lock}" if i.ok
                             else "❌ " + "; ".join(i.problems[:5])),
        "",
        "**Resumable:** " + _RESUME_MARK[r.status] + " " + resume_summary(r),
    ]
    if report.rules:
        lines += ["", "| rule | result | values |", "|---|---|---|"]
        lines += [f"| `{x.rule}` | {_MARK[x.status]} | {x.detail} |" for x in report.rules]
    lines += ["", f"**Result:** {'passed' if report.passed else report.reason}", ""]
    return "\n".join(lines)


def non_numeric_summary(report: CheckReport) -> str:
    """``candidate: name='text'; baseline: ...`` for metrics whose values are not numbers."""
    parts = []
    for word, side in (("candidate", report.candidate), ("baseline", report.baseline)):
        if side.non_numeric:
            items = sorted(side.non_numeric.items())
            shown = ", ".join(f"{clip(k, 40)[1:-1]}={v}" for k, v in items[:10])
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            parts.append(f"{word}: {shown}{more}")
    return "; ".join(parts)


def _md_escape(text: str) -> str:
    """Untrusted text (metric names come from files) that cannot break a table or a code span."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")


def resume_summary(r: Resumability) -> str:
    """One line on what the restore did, for the report and the terminal."""
    if r.status == "skipped":
        return f"not tried: {r.problem}"
    if r.status == "failed":
        return str(r.problem)
    into = (f"what {r.factory} builds" if r.mode == "factory"
            else "buffers rebuilt from the checkpoint's own shapes (no --model: the "
            "architecture itself was not checked)")
    rest = f"; not restored: {', '.join(r.not_restored)}" if r.not_restored else ""
    return f"restored {', '.join(r.restored)} into {into}{rest}"


COMMANDS = [check_cmd]
