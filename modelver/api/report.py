"""modelver report: one HTML page of an artifact's versions (metrics, layer changes, lineage)."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelver.api.history import HistoryEvent
    from modelver.api.versions import VersionInfo
    from modelver.diff import CheckpointDiff
    from modelver.report import Chart


@dataclass(frozen=True)
class ReportResult:
    """What a report page shows: the artifact, its versions, and the two versions compared
    (None when it has fewer than two)."""

    path: Path
    name: str
    versions: int
    events: int
    compared: tuple[str, str] | None
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "versions": self.versions,
                "events": self.events, "compared": self.compared, "size": self.size}


def report(
    name: str | None = None,
    *,
    html: str | Path,
    a: str | None = None,
    b: str | None = None,
    repo_root: str | Path = ".",
) -> ReportResult:
    """Write one self-contained page: metrics across ``name``'s versions with stage markers,
    the change of every layer from A to B (default: the latest two versions), and the lineage.
    ``name`` may be left out when the repository has one artifact. A and B are versions,
    commits or checkpoint directories; torch is never imported (see ``modelver.report``)."""
    from modelver.api.history import history
    from modelver.api.versions import list_versions
    from modelver.diff import DiffSide
    from modelver.errors import ArtifactNotFoundError, InvalidArgumentError
    from modelver.materialize import checkpoint_dir_for
    from modelver.report import layer_chart, lineage_chart, measure_layers, metrics_chart, page

    out = _output(html)
    versions = [x for x in list_versions(name, repo_root=repo_root, dvc_metrics=True,
                                         deprecated=True)
                if x.invalid is None and x.version is not None]
    names = sorted({x.name for x in versions})
    if name is None:
        if len(names) != 1:
            raise ArtifactNotFoundError("(none given)", known=names)
        name = names[0]
    events = history(name, repo_root=repo_root)
    if (a is None) != (b is None):
        raise InvalidArgumentError("--a/--b", a or b, expected="both versions, or neither")
    live = [x for x in versions if x.deprecated is None]
    if a is None and len(live) >= 2:
        a, b = (str(live[-2].tag), str(live[-1].tag))
    charts = [_metrics(versions, events, metrics_chart)]
    compared = None
    if a is not None and b is not None:
        def side(ref: str) -> DiffSide:
            return DiffSide(checkpoint_dir_for(ref, repo_root=repo_root, action="cannot compare"),
                            ref)

        charts.append(layer_chart(measure_layers(side(a), side(b))))
        compared = (a, b)
    charts.append(_lineage(versions, events, lineage_chart))
    size = _write(out, page(f"{name}: versions", charts))
    return ReportResult(out, name, len(versions), len(events), compared, size)


def write_diff_html(result: CheckpointDiff, path: str | Path) -> int:
    """The per-layer chart of one diff, alone on a page; returns the page's size in bytes."""
    from modelver.report import layer_chart, layers_of, page

    return _write(_output(path), page(f"{result.a.label} → {result.b.label}",
                                      [layer_chart(layers_of(result))]))


def _output(path: str | Path) -> Path:
    """Where the page goes: a file in an existing directory (the user's own choice of path)."""
    from modelver.errors import InvalidArgumentError

    out = Path(path)
    if out.is_dir() or not out.parent.is_dir():
        raise InvalidArgumentError("--html", str(path),
                                   expected="a file path in an existing directory")
    return out


def _write(out: Path, text: str) -> int:
    """Written beside the target and renamed over it: a reader never sees half a page, and a
    symlink at the path is replaced, not followed."""
    from modelver.errors import CheckpointWriteError

    data = text.encode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise CheckpointWriteError(out, e, what="report") from e
    return len(data)


def _stages(events: list[HistoryEvent]) -> dict[str, list[str]]:
    """Version -> the stages it was ever assigned, in order."""
    out: dict[str, list[str]] = {}
    for e in events:
        if e.kind == "assignment" and e.version and e.stage:
            got = out.setdefault(e.version, [])
            if e.stage not in got:
                got.append(e.stage)
    return out


def _metrics(versions: list[VersionInfo], events: list[HistoryEvent], chart: Any) -> Chart:
    """Every numeric metric of every version: the manifest's, and the DVC metrics files' as
    ``FILE:NAME`` (as ``modelver diff`` names them); text values and NaN are left out."""
    stages = _stages(events)
    rows = []
    for x in versions:
        values: dict[str, object] = dict(x.metrics)
        for rel, m in (x.dvc_metrics or {}).items():
            values.update({f"{rel}:{k}": val for k, val in m.items()})
        marks = ", ".join(stages.get(str(x.version), x.stages))
        for metric, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
                value
            ):
                rows.append({"version": str(x.version), "metric": metric, "value": value,
                             "stages": marks})
    return chart(rows, [str(x.version) for x in versions])


def _lineage(versions: list[VersionInfo], events: list[HistoryEvent], chart: Any) -> Chart:
    """Versions (the deprecated ones too) with parent, stages ever assigned, current stages
    and the tag that deprecated them; the events for the timeline."""
    stages = _stages(events)
    info = {str(x.version): x for x in versions}
    order = list(dict.fromkeys([e.version for e in events if e.version] + list(info)))
    rows = [("version", "parent", "step", "commit", "stages (ever)", "stages (now)",
             "deprecated")]
    for ver in order:
        x = info.get(ver)
        rows.append((ver, (x.parent or "") if x else "", str(x.step) if x and x.step is not None
                     else "", x.commit[:10] if x else "", ", ".join(stages.get(ver, [])),
                     ", ".join(x.stages) if x else "", (x.deprecated or "") if x else ""))
    points = [{"version": e.version or "(artifact)", "kind": e.kind, "created": e.created,
               "tag": e.tag, "stage": e.stage or "", "author": e.author} for e in events]
    return chart(points, rows)
