"""One self-contained HTML page of charts: Vega-Lite specs, drawn by Vega inlined in the page.

No network is needed to view it: vega and vega-lite (BSD-3-Clause, ``modelver/assets``) are
inlined rather than loaded from a CDN, which is what dvc-render's pages do. Everything that
comes from a repository (tags, metric and tensor names, messages) is data: HTML-escaped in the
page's text, and JSON with ``<``, ``>`` and ``&`` escaped inside the spec scripts, so no crafted
name can close a script or add markup. A Content-Security-Policy forbids any fetch.

The layer chart's numbers are computed here with numpy (:func:`measure_layers`), not by
``modelver.diff``'s torch arithmetic: importing torch alone takes longer than a whole report.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelver.checkpoint import format as fmt
from modelver.checkpoint.delta import LogicalFile, open_logical
from modelver.diff import CHANGED, DiffSide, Endpoint, match_tensors
from modelver.errors import CheckpointCorruptedError
from modelver.hashing import new_hasher
from modelver.layout import OPTIMIZER, read_layout_file

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


@dataclass(frozen=True)
class LayerChange:
    """One bar: a tensor, its status, and ||b-a||/||a|| (None: not changed, its shape changed,
    or A is all zeros)."""

    tensor: str
    status: str
    change: float | None


@dataclass(frozen=True)
class Layers:
    """What the layer chart shows: both sides, and every tensor but optimizer state in the
    model's layout (state-dict order)."""

    a: Endpoint
    b: Endpoint
    tensors: tuple[LayerChange, ...]


def layers_of(result: CheckpointDiff) -> Layers:
    """The chart's bars from a full diff (``modelver diff --html``)."""
    rows = tuple(LayerChange(t.name, t.status, None if t.stats is None else t.stats.rel_change)
                 for t in result.tensors if t.place is None or t.place.role != OPTIMIZER)
    return Layers(result.a, result.b, rows)


def layer_chart(layers: Layers) -> Chart:
    """Relative L2 change ||b-a||/||a|| of every tensor but optimizer state, one bar each, in
    the model's layout; a tensor with no ratio is listed with an empty bar."""
    rows = [{"tensor": t.tensor, "status": t.status,
             "change": t.change if t.change is not None and math.isfinite(t.change) else None}
            for t in layers.tensors]
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
    changed = sum(1 for r in rows if r["status"] == CHANGED)
    a, b = layers.a, layers.b
    text = (f"{b.label} against {a.label} (steps {a.step} → {b.step}): {changed} of "
            f"{len(rows)} tensors changed (optimizer state left out), in the model's layout "
            "order.")
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


# --- the layer chart's numbers, with numpy ---------------------------------------------------

VALUES = 1 << 18  # values read and widened at a time: memory stays a few MiB per side
# stored dtype -> numpy's, little-endian; complex64 as float32 pairs (|z|² = re² + im²)
_NUMPY = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "complex64": "<f4",
          "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint64": "<u8",
          "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "u1"}


@cache
def _e4m3fn() -> np.ndarray:
    """float8_e4m3fn's 256 values: 4 exponent bits (bias 7), 3 mantissa bits, no infinities,
    NaN at exponent and mantissa all ones."""
    bits = np.arange(256)
    exp, man = (bits >> 3) & 15, bits & 7
    mag = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    mag[(exp == 15) & (man == 7)] = np.nan
    return np.where(bits >= 128, -mag, mag)


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bytes as float64. bfloat16 and float8 have no numpy dtype: bfloat16 is the top
    half of a float32 and float8_e5m2 the top byte of a float16, so their bits are shifted
    into place; float8_e4m3fn is looked up."""
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "float8_e5m2":
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float64)
    if dtype == "float8_e4m3fn":
        return _e4m3fn()[raw]
    return raw.view(_NUMPY[dtype]).astype(np.float64)


class _Side:
    """One tensor's values, read chunk by chunk, its bytes hashed as they arrive."""

    def __init__(self, root: Path, file: LogicalFile, entry: fmt.TensorEntry) -> None:
        self.root, self.file, self.entry = root, file, entry
        self.size = fmt.DTYPES[entry.dtype][1] // (2 if entry.dtype == "complex64" else 1)
        self.count = entry.nbytes // self.size
        self.hash = new_hasher("xxh3")

    def values(self, start: int, stop: int) -> np.ndarray:
        buf = bytearray((stop - start) * self.size)
        got = self.file.pread_into(self.entry.offsets[0] + start * self.size, memoryview(buf))
        if got != len(buf):
            raise self.corrupted("truncated")
        self.hash.update(buf)
        return _widen(np.frombuffer(buf, np.uint8), self.entry.dtype)

    def corrupted(self, problem: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(self.root, [f"tensor {self.entry.name}: {problem}"])


def _rel_change(a: _Side, b: _Side) -> float | None:
    """||b-a||/||a|| over both sides' values, summed in float64; every byte read is checked
    against the manifest's tensor hash before its number is used."""
    if a.count != b.count:  # complex64 against a real dtype of the same shape
        return None
    saa = sdd = 0.0
    for start in range(0, a.count, VALUES):
        x = a.values(start, min(a.count, start + VALUES))
        d = x - b.values(start, min(a.count, start + VALUES))
        # einsum's own loop, not BLAS, whose threads wait on each other on busy cores (the
        # benchmark's 16 tensors of 64 Ki values: 0.17 s with BLAS, 0.02 s, 2 loaded cores)
        saa += float(np.einsum("i,i->", x, x))
        sdd += float(np.einsum("i,i->", d, d))
    for side in (a, b):
        if side.hash.hexdigest() != side.entry.hash:
            raise side.corrupted("content hash differs")
    if saa > 0:
        return math.sqrt(sdd / saa)
    return 0.0 if sdd == 0 else None


def measure_layers(a: DiffSide, b: DiffSide) -> Layers:
    """The layer chart of step directory B against A: statuses from the manifests (equal
    hashes: unchanged, never read), places from state.json, and the change of each changed
    model tensor read from its byte range (delta files decoded)."""
    assert a.path is not None and b.path is not None
    path_a, path_b = a.path, b.path
    ma, mb = a.read_manifest(), b.read_manifest()
    layout = {**read_layout_file(path_a, ma), **read_layout_file(path_b, mb)}
    done: dict[tuple[str, str, str, str], float | None] = {}  # tied tensors are read once
    rows = []
    with contextlib.ExitStack() as stack:
        files: dict[tuple[Path, str], LogicalFile] = {}

        def side(root: Path, manifest: fmt.Manifest, entry: fmt.TensorEntry) -> _Side:
            if (root, entry.file) not in files:
                opened = open_logical(root, manifest, entry.file)
                files[root, entry.file] = stack.enter_context(opened)
            return _Side(root, files[root, entry.file], entry)

        for t in match_tensors(ma, mb, layout):
            if t.place is not None and t.place.role == OPTIMIZER:
                continue
            change = None
            if t.status == CHANGED and t.a and t.b and t.a.shape == t.b.shape:
                key = (t.a.hash, t.a.dtype, t.b.hash, t.b.dtype)
                if key not in done:
                    done[key] = _rel_change(side(path_a, ma, t.a), side(path_b, mb, t.b))
                change = done[key]
            rows.append(LayerChange(t.name, t.status, change))
    return Layers(Endpoint(a.label, path_a, ma.step), Endpoint(b.label, path_b, mb.step),
                  tuple(rows))
