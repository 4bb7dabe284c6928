"""DVCLive metrics that survive a kill: the history is cut back to the checkpoint that resumes.

DVCLive appends a row to ``dvclive/plots/metrics/<name>.tsv`` at every ``log_metric`` and, with
``Live(resume=True)``, continues after the last step it logged. After a kill that step is ahead
of the last checkpoint, so the resumed run logs the steps in between a second time. Here the
checkpoint carries DVCLive's step: :class:`LiveStep` is a component of the training state
(saved with every checkpoint, restored by ``CheckpointManager.restore``), and
``LiveStep.open()`` cuts every history file back to the rows before that step, rewrites the
summary (``dvclive/metrics.json``) to match, and opens ``Live(resume=True)`` at exactly that
step. :func:`truncate_history` and :func:`resume_live` do the same for a step carried another way.

The checkpoint also records the last row of every history file; a resume refuses a ``dvclive/``
whose rows before the step differ (another run's history, e.g. after ``dvc exp run -S`` back to an
earlier run) instead of splicing two runs into one plot.

Handled: metric histories (``*.tsv`` under ``plots/metrics``, any depth; a last line torn by the
kill is dropped) and the summary (each history's last kept value, ``step``; keys without a
history file, ``log_metric(plot=False)``, keep their value). Not touched: images, custom and
sklearn plots, params and artifacts. DVCLive rewrites an image or plot whole when it is logged
again, so a deterministic resumed run ends with the files an uninterrupted one writes; a file
first written after the checkpoint stays until then. Every rewrite is a temporary file and an
``os.replace``, and cutting back is idempotent: a kill during it is undone by the next resume.
Needs ``dvclive`` (imported only by :func:`resume_live` and ``LiveStep.open``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from modelver import untrusted
from modelver.errors import (
    InvalidArgumentError,
    LiveHistoryError,
    MalformedDataError,
    ModelverWarning,
)

if TYPE_CHECKING:
    from dvclive import Live

METRICS_DIR = PurePosixPath("plots/metrics")  # where Live.log_metric appends, under Live.dir
SUMMARY = "metrics.json"  # Live.make_summary
STEP = "step"
_TMP = ".modelver-tmp"  # suffix of this module's temporary files (no history matches *.tsv)
_STEP_RE = re.compile(r"^(0|[1-9][0-9]*)$")
_INT_RE = re.compile(r"^-?(0|[1-9][0-9]*)$")
_TAIL = 1 << 16  # bytes read from the end of a history to find its last row
_MAX_HISTORY = 1 << 30

__all__ = ["LiveHistoryError", "LiveStep", "TruncatedHistory", "resume_live", "truncate_history"]


@dataclass(frozen=True)
class TruncatedHistory:
    """What :func:`truncate_history` did to a DVCLive directory."""

    directory: Path
    step: int  # every history now ends before this step
    kept: int  # rows kept, all files together
    dropped: int  # rows at or after ``step`` removed (torn last lines included)
    rewritten: tuple[Path, ...]  # history files cut back
    removed: tuple[Path, ...]  # history files left without rows, deleted
    summary: Path | None  # the summary, where it was (re)written


@dataclass(frozen=True)
class _History:
    path: Path
    name: str  # relative to METRICS_DIR, POSIX, with ".tsv"
    header: list[str]
    rows: list[tuple[int, list[str]]]
    torn: bool  # the last line had no line end (a kill during the append): left out of rows


def truncate_history(
    dir: str | Path = "dvclive",  # Live's own name for it
    *,
    step: int,
    expect: Mapping[str, list[str]] | None = None,
) -> TruncatedHistory:
    """Cut every metric history under ``dir`` to the rows whose step is below ``step`` and
    rewrite the summary to match.

    ``expect`` (file name under ``plots/metrics`` -> last row before ``step``, as
    :class:`LiveStep` records at a save) makes a history that differs a
    :class:`LiveHistoryError`. Every file is read and checked before any is written: a malformed
    one is a :class:`~modelver.errors.MalformedDataError` and nothing changes.
    """
    step = _step_arg(step)
    root = Path(dir)
    histories = [_read_history(root, name) for name in _history_names(root)]
    if expect is not None:
        _check_expected(root, histories, step, expect)
    summary_path = untrusted.inside(root, SUMMARY, field="DVCLive summary")
    summary, summary_text = _read_summary(summary_path)
    if summary is None and histories:
        summary = {}
    _remove_temporaries(root)
    rewritten, removed = [], []
    kept = dropped = 0
    for h in histories:
        rows = [fields for s, fields in h.rows if s < step]
        kept += len(rows)
        dropped += len(h.rows) - len(rows) + h.torn
        if not rows:
            h.path.unlink()
            removed.append(h.path)
        elif len(rows) < len(h.rows) or h.torn:
            _write_atomic(h.path, _tsv([h.header, *rows]))
            rewritten.append(h.path)
        if summary is not None:  # always, with a history: set above
            _summarise(summary, h.name, rows[-1][-1] if rows else None)
    written = None
    if summary is not None:
        if step > 0:
            summary[STEP] = step - 1  # Live.next_step() leaves the step of its last rows
        else:
            summary.pop(STEP, None)
        text = json.dumps(summary, indent=4) + "\n"
        if text != summary_text:
            _write_atomic(summary_path, text)
            written = summary_path
    return TruncatedHistory(
        root, step, kept, dropped, tuple(rewritten), tuple(removed), written
    )


def resume_live(
    step: int | None,
    *,
    dir: str | Path = "dvclive",
    expect: Mapping[str, list[str]] | None = None,
    **live_options: Any,
) -> Live:
    """``Live(resume=True)`` at ``step`` after :func:`truncate_history`; with ``step=None`` (no
    checkpoint) a fresh ``Live(resume=False)``, which clears ``dir`` as DVCLive always does.

    ``live_options`` go to ``Live`` (``dvcyaml``, ``report``, ``save_dvc_exp``, …).
    """
    if "resume" in live_options:
        raise InvalidArgumentError(
            "resume", live_options["resume"], expected="no value: the checkpoint decides"
        )
    from dvclive import Live

    if step is None:
        return Live(dir=str(dir), resume=False, **live_options)
    truncate_history(dir, step=step, expect=expect)
    live = Live(dir=str(dir), resume=True, **live_options)
    live.step = step  # Live's own resume reads the summary's step + 1, except after step 0
    return live


class LiveStep:
    """DVCLive's step as a component of the training state (``state["dvclive"] = LiveStep()``).

    Saved with every checkpoint: the step DVCLive's next row gets and the last row of each
    history file. Save after ``live.next_step()``: a save that finds a row at or after the
    step it records is refused, since a resume would lose that row.
    """

    def __init__(self, dir: str | Path = "dvclive") -> None:
        self.dir = Path(dir)
        self._live: Live | None = None
        self._restored: dict[str, Any] | None = None
        self._ended: int | None = None  # the step when open() ended (Live.end() rewinds it)

    @property
    def step(self) -> int | None:
        """The step DVCLive logs next; None before a restore or ``open()``."""
        if self._live is not None:
            return self._live.step
        if self._ended is not None:
            return self._ended
        return None if self._restored is None else self._restored[STEP]

    def state_dict(self) -> dict[str, Any]:
        if self._live is None and self._ended is None:
            return self._restored or {STEP: None, "last_rows": {}}
        step = self.step
        assert step is not None
        return {STEP: step, "last_rows": _last_rows(self.dir, before=step)}

    def load_state_dict(self, value: Mapping[str, Any]) -> None:
        what = "checkpoint component LiveStep"
        value = untrusted.mapping(value, what=what, field="state")
        step = value.get(STEP)
        if step is not None:
            step = untrusted.integer(step, what=what, field=STEP)
        rows = untrusted.mapping(value.get("last_rows", {}), what=what, field="last_rows")
        for name, row in rows.items():
            if not isinstance(row, list) or not all(isinstance(f, str) for f in row):
                raise MalformedDataError(what, f"last_rows.{name}", row, expected="strings")
        self._restored = None if step is None else {STEP: step, "last_rows": dict(rows)}
        self._ended = None

    @contextmanager
    def open(self, **live_options: Any) -> Iterator[Live]:
        """The ``Live`` of this run, ended on exit: resumed at the restored checkpoint's step
        (history cut back to it), or fresh when nothing was restored."""
        restored = self._restored
        if self._ended is not None:  # opened before in this process: it goes on from there
            self._live = resume_live(self._ended, dir=self.dir, **live_options)
        else:
            self._live = resume_live(
                None if restored is None else restored[STEP],
                dir=self.dir,
                expect=None if restored is None else restored["last_rows"],
                **live_options,
            )
        try:
            yield self._live
        finally:
            live, self._live = self._live, None
            self._ended = live.step
            live.end()


# --- reading ----------------------------------------------------------------------------------


def _step_arg(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgumentError("step", step, expected="an integer ≥ 0")
    return step


def _history_names(root: Path) -> list[str]:
    """History files under ``root/plots/metrics``, as POSIX names relative to it (symlinked
    directories are not entered; a symlinked file is refused when it is read)."""
    top = root / METRICS_DIR
    names = []
    for parent, dirs, files in os.walk(top):
        dirs.sort()
        rel = PurePosixPath(Path(parent).relative_to(top).as_posix())
        names += [str(rel / f) for f in sorted(files) if f.endswith(".tsv")]
    return names


def _read_history(root: Path, name: str) -> _History:
    what = f"DVCLive history {METRICS_DIR / name}"
    path = untrusted.inside(root, str(METRICS_DIR / name), field="DVCLive history")
    size = path.stat().st_size
    if size > _MAX_HISTORY:
        raise MalformedDataError(what, "size", size, expected=f"at most {_MAX_HISTORY} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedDataError(what, "content", str(e), expected="UTF-8 text") from e
    torn = bool(text) and not text.endswith("\n")
    if torn:
        text = text[: text.rfind("\n") + 1]
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    except csv.Error as e:
        raise MalformedDataError(what, "content", str(e), expected="tab-separated rows") from e
    if not records:
        return _History(path, name, [], [], torn)
    header = records[0]
    if STEP not in header or len(header) < 2:
        raise MalformedDataError(what, "header", header, expected="a 'step' and a value column")
    at = header.index(STEP)
    rows = []
    for line, fields in enumerate(records[1:], start=2):
        if len(fields) != len(header) or not _STEP_RE.match(fields[at]):
            raise MalformedDataError(
                what, f"line {line}", fields, expected=f"{len(header)} fields, an integer step"
            )
        rows.append((int(fields[at]), fields))
    return _History(path, name, header, rows, torn)


def _read_summary(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The summary as a dict, and its text; one DVCLive left half-written (it writes in place)
    is rebuilt from the histories, with a warning."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    try:
        summary = untrusted.load_json(data, what=f"DVCLive summary {path}")
    except MalformedDataError:
        summary = None
    if not isinstance(summary, dict):
        warnings.warn(
            f"{path} is not a JSON object (written when the run was killed?): rebuilt from the "
            "metric histories; values logged with plot=False are lost",
            ModelverWarning,
            stacklevel=3,
        )
        return {}, None
    return summary, data.decode("utf-8", errors="replace")


def _check_expected(
    root: Path, histories: list[_History], step: int, expect: Mapping[str, list[str]]
) -> None:
    """Each history's last row before ``step`` is the one the checkpoint saw, and no history
    the checkpoint did not see has rows before it."""
    last = {h.name: fields for h in histories for s, fields in h.rows if s < step}
    for name in sorted(set(last) | set(expect)):
        if last.get(name) != expect.get(name):
            raise LiveHistoryError(
                f"{root}: history {METRICS_DIR / name} does not hold the rows the checkpoint at "
                f"DVCLive step {step} saw (last row {last.get(name)}, checkpoint saw "
                f"{expect.get(name)}): it is another run's history or was changed",
                hint=f"bring back this run's {root}/ (git checkout, dvc exp apply), or delete "
                f"{root}/ to continue without the history before step {step}",
            )


def _last_rows(root: Path, *, before: int) -> dict[str, list[str]]:
    """The last row of each history (read from its end), refused where it is not before
    ``before``: a checkpoint saved before ``live.next_step()`` would lose that row."""
    out = {}
    for name in _history_names(root):
        row = _last_row(root / METRICS_DIR / name)
        if row is None:
            continue
        step = row[1]
        if step >= before:
            raise LiveHistoryError(
                f"{root / METRICS_DIR / name} has a row at step {step}, not before the DVCLive "
                f"step {before} this checkpoint records",
                hint="save the checkpoint after live.next_step(), not between log_metric() and it",
            )
        out[name] = row[0]
    return out


def _last_row(path: Path) -> tuple[list[str], int] | None:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - _TAIL)
        f.seek(start)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    if start > 0:
        lines = lines[1:]  # cut in the middle of a line
    if not lines:
        return None
    fields = next(csv.reader([lines[-1]], delimiter="\t"))
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t"), [])
    if STEP not in header or fields == header:
        return None
    at = header.index(STEP)
    if len(fields) != len(header) or not _STEP_RE.match(fields[at]):
        raise MalformedDataError(
            f"DVCLive history {path}", "last line", fields, expected="an integer step"
        )
    return fields, int(fields[at])


# --- writing ----------------------------------------------------------------------------------


def _summarise(summary: dict[str, Any], name: str, value: str | None) -> None:
    """Set (or, with no row left, remove) a history's entry where Live.log_metric puts it:
    ``a/b.tsv`` is ``summary["a"]["b"]``."""
    *parents, leaf = name[: -len(".tsv")].split("/")
    node = summary
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            if value is None:
                return
            child = node[key] = {}
        node = child
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = _number(value)


def _number(text: str) -> Any:
    """A history's value as DVCLive's summary holds it: int, finite float, or the text
    (DVCLive logs NaN and infinities as strings)."""
    if _INT_RE.match(text):
        return int(text)
    try:
        x = float(text)
    except ValueError:
        return text
    return x if x == x and abs(x) != float("inf") else text


def _tsv(records: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, delimiter="\t", lineterminator=os.linesep).writerows(records)
    return out.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_temporaries(root: Path) -> None:
    """This module's temporary files a killed cut-back left (only its own suffix)."""
    for parent, _dirs, files in os.walk(root):
        for f in files:
            if f.startswith(".") and f.endswith(_TMP):
                Path(parent, f).unlink(missing_ok=True)
