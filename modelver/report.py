"""One self-contained HTML page of charts: Vega-Lite specs, drawn by Vega inlined in the page.

No network is needed to view it: vega and vega-lite (BSD-3-Clause, ``modelver/assets``) are
inlined rather than loaded from a CDN, which is what dvc-render's pages do. Everything that
comes from a repository (tags, metric and tensor names, messages) is data: HTML-escaped in the
page's text, and JSON with ``<``, ``>`` and ``&`` escaped inside the spec scripts, so no crafted
name can close a script or add markup. A Content-Security-Policy forbids any fetch.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelver.diff import CheckpointDiff

ASSETS = ("vega.min.js", "vega-lite.min.js")
KINDS = ("registration", "assignment", "unassignment", "deprecation")
CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
       "style-src 'unsafe-inline'; img-src data:")  # vega compiles expressions: unsafe-eval
_DRAW = """
for (const el of document.querySelectorAll('script[data-chart]')) {
  const target = document.getElementById(el.dataset.chart);
  try {
    const spec = vegaLite.compile(JSON.parse(el.textContent)).spec;
    new vega.View(vega.parse(spec), {renderer: 'svg', container: target, hover: true})
      .runAsync()
      .then(() => target.setAttribute('data-rendered', 'true'))
      .catch((e) => { target.textContent = 'chart failed: ' + e; });
  } catch (e) { target.textContent = 'chart failed: ' + e; }
}
"""
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222 }
h1 { font-size: 1.5em } h2 { font-size: 1.2em; margin-top: 2em }
table { border-collapse: collapse } td, th { padding: 2px 10px; text-align: left }
tr:nth-child(even) { background: #f4f4f4 } .dim { color: #777 } code { font-size: 0.95em }
"""


@dataclass(frozen=True)
class Chart:
    """A section of the page: a heading, a line of text and a Vega-Lite spec (or none)."""

    heading: str
    text: str
    spec: Mapping[str, Any] | None = None
    table: tuple[tuple[str, ...], ...] = ()  # first row: the header


@cache
def _script(name: str) -> str:
    return resources.files("modelver.assets").joinpath(name).read_text(encoding="utf-8")


def _json_in_script(data: object) -> str:
    """JSON that cannot end its <script> element or start markup, whatever strings it holds."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def page(title: str, charts: Sequence[Chart]) -> str:
    """The whole page: every chart's spec, the two libraries and the code that draws them."""
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for i, c in enumerate(charts):
        body.append(f"<h2>{e(c.heading)}</h2><p>{e(c.text)}</p>")
        if c.spec is not None:
            body.append(f'<div class="chart" id="chart-{i}"></div>'
                        f'<script type="application/json" data-chart="chart-{i}">'
                        f"{_json_in_script(c.spec)}</script>")
        if c.table:
            head, *rows = c.table
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            body.extend("<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in rows)
            body.append("</table>")
    libs = "".join(f"<script>{_script(n)}</script>" for n in ASSETS)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(body) + f"{libs}<script>{_DRAW}</script></body></html>\n")


# --- the charts ---------------------------------------------------------------------------


def layer_chart(result: CheckpointDiff) -> Chart:
    """Relative L2 change ||b-a||/||a|| of every tensor but optimizer state, one bar each, in
    the model's layout (state-dict order); a tensor whose shape changed, or whose A is all
    zeros, has no ratio and is listed with an empty bar."""
    rows = []
    for t in result.tensors:
        if t.place is not None and t.place.role == "optimizer":
            continue
        rel = None if t.stats is None else t.stats.rel_change
        finite = rel is not None and math.isfinite(rel)
        rows.append({"tensor": t.name, "status": t.status, "change": rel if finite else None})
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": rows},
        "width": 700,
        "height": {"step": 14},
        "mark": {"type": "bar", "tooltip": True},
        "encoding": {
            "y": {"field": "tensor", "type": "nominal", "sort": None, "title": None},
            "x": {"field": "change", "type": "quantitative", "title": "||b - a|| / ||a||"},
            "color": {"field": "status", "type": "nominal",
                      "scale": {"domain": ["changed", "unchanged", "added", "removed"]}},
        },
    }
    changed = sum(1 for r in rows if r["status"] == "changed")
    text = (f"{result.b.label} against {result.a.label} (steps {result.a.step} → "
            f"{result.b.step}): {changed} of {len(rows)} tensors changed (optimizer state "
            "left out), in the model's layout order.")
    return Chart("Change of every layer", text, spec)


def metrics_chart(rows: Sequence[Mapping[str, Any]], order: Sequence[str]) -> Chart:
    """One line per metric over the versions in order (a panel each: scales differ), with a
    marker and the stage names at versions that were assigned a stage. ``rows``: version,
    metric, value, stages (text, empty when none)."""
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": list(rows)},
        "facet": {"row": {"field": "metric", "type": "nominal", "title": None}},
        "resolve": {"scale": {"y": "independent"}},
        "spec": {
            "width": 800,
            "height": 120,
            "encoding": {
                "x": {"field": "version", "type": "ordinal", "sort": list(order)},
                "y": {"field": "value", "type": "quantitative", "title": None,
                      "scale": {"zero": False}},
            },
            "layer": [
                {"mark": {"type": "line", "point": True, "tooltip": True}},
                {"transform": [{"filter": "datum.stages != ''"}],
                 "mark": {"type": "point", "shape": "triangle-up", "size": 120,
                          "filled": True, "color": "#d62728", "tooltip": True}},
                {"transform": [{"filter": "datum.stages != ''"}],
                 "mark": {"type": "text", "dy": -12, "color": "#d62728"},
                 "encoding": {"text": {"field": "stages"}}},
            ],
        },
    }
    text = (f"{len(order)} versions, {len({r['metric'] for r in rows})} metrics; triangles "
            "mark versions assigned a stage.")
    return Chart("Metrics across versions", text, spec)


def lineage_chart(events: Sequence[Mapping[str, Any]], table: Sequence[tuple[str, ...]]) -> Chart:
    """The registry's events over time (registrations, stage assignments, deprecations) and a
    table of the versions with their parents, stages and deprecation."""
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": list(events)},
        "width": 800,
        "height": {"step": 16},
        "mark": {"type": "point", "filled": True, "size": 80, "tooltip": True},
        "encoding": {
            "x": {"field": "created", "type": "temporal", "title": "time"},
            "y": {"field": "version", "type": "ordinal", "sort": None, "title": None},
            "color": {"field": "kind", "type": "nominal", "scale": {"domain": list(KINDS)}},
            "shape": {"field": "kind", "type": "nominal", "scale": {"domain": list(KINDS)}},
        },
    }
    text = f"{len(events)} events; one row a version, oldest first."
    return Chart("Lineage", text, spec if events else None, tuple(table))
