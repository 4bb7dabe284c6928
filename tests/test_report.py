"""`modelver report`: one self-contained HTML page, drawn by a real headless Chromium."""

from __future__ import annotations

import math
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.helpers import git, run, set_params, train_and_commit, write_metrics

CHROMIUM = Path("/usr/bin/chromium")  # the Debian package; CI installs it
CRAFTED = "</script><img src=x onerror=alert(1)>"


def chromium(page: Path, tmp_path: Path, *args: str) -> str:
    """Chromium headless on ``page`` (no network: the page must draw from what it holds)."""
    assert CHROMIUM.is_file(), "headless Chromium is required: apt-get install chromium"
    out = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=15000",
         "--proxy-server=127.0.0.1:9", *args, page.as_uri()],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    return out.stdout


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """(width, height, the decompressed scanlines) of a PNG: enough to tell it is not blank."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


@pytest.fixture
def versions(gated: Path) -> Path:
    """Three versions of `tiny`: v0.1.0 (production, then deprecated), v0.2.0 in staging whose
    metrics file holds a crafted name, v0.3.0."""
    write_metrics(gated, accuracy=0.93, **{CRAFTED: 1.0})
    set_params(gated, steps=30)
    train_and_commit(gated, "v0.2.0")
    for args in (("tag", "tiny@v0.2.0"), ("promote", "tiny@v0.2.0", "staging")):
        assert run(gated, *args, "-q").exit_code == 0
    write_metrics(gated, accuracy=0.95, **{CRAFTED: 2.0})
    set_params(gated, steps=40)
    train_and_commit(gated, "v0.3.0")
    assert run(gated, "tag", "tiny@v0.3.0", "-q").exit_code == 0
    assert run(gated, "deprecate", "tiny@v0.1.0").exit_code == 0
    return gated


@pytest.mark.slow
def test_report_draws_three_charts_in_chromium(versions: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    res = run(versions, "report", "--html", str(page))
    assert res.exit_code == 0, res.stderr
    assert "layers of tiny@v0.3.0 against tiny@v0.2.0" in res.stdout
    text = page.read_text()
    assert CRAFTED not in text and "<img" not in text  # escaped in the specs and the tables
    assert "<script src" not in text and "<link" not in text  # nothing to fetch
    # the lineage table: parents, stages ever held, the deprecation tag
    assert re.search(r"<td>v0\.1\.0</td><td></td><td>20</td><td>\w+</td><td>production</td>"
                     r"<td></td><td>tiny@v0\.1\.0!</td>", text), text[-3000:]
    assert "<td>v0.3.0</td><td>v0.2.0</td><td>40</td>" in text

    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.count('data-rendered="true"') == 3, "a chart did not render"
    charts = re.split(r'<div class="chart" id="chart-\d"', dom)[1:]
    assert len(charts) == 3
    for chart in charts:  # each chart: SVG with vega mark groups holding drawn marks
        assert "<svg" in chart and 'role-mark' in chart
        assert re.search(r'class="mark-(rect|line|symbol)[^"]*role-mark[^"]*"[^>]*>\s*<path',
                         chart), chart[:2000]
    # the crafted metric name is text in the chart, never an element
    assert "<img" not in dom and "&lt;img src=x onerror=alert(1)&gt;" in dom
    assert "<title>tiny: versions</title>" in dom
    # the layer chart: one bar per model tensor, in the model's layout, no optimizer state
    layer = charts[1]
    assert "optimizer/" not in layer and layer.count('aria-roledescription="bar"') >= 4

    shot = tmp_path / "report.png"
    chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000")
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1200, 2000)
    assert len(set(pixels)) > 50, "the screenshot is blank"


@pytest.mark.slow
def test_report_refusals_change_nothing_and_json(versions: Path, tmp_path: Path) -> None:
    import json

    page = tmp_path / "missing" / "r.html"
    res = run(versions, "report", "--html", str(page))
    assert res.exit_code == 2 and res.stderr.startswith("error:") and "--html" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not page.parent.exists()
    res = run(versions, "report", "--html", str(tmp_path))  # a directory
    assert res.exit_code == 2 and "--html" in res.stderr
    res = run(versions, "report", "--html", str(tmp_path / "r.html"), "--a", "tiny@v0.2.0")
    assert res.exit_code == 2 and "--a/--b" in res.stderr
    res = run(versions, "report", "nope", "--html", str(tmp_path / "r.html"))
    assert res.exit_code == 1 and "nope" in res.stderr
    res = run(versions, "report", "../x", "--html", str(tmp_path / "r.html"))
    assert res.exit_code != 0 and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
    assert git(versions, "status", "--porcelain") == ""

    page = tmp_path / "r.html"
    res = run(versions, "report", "tiny", "--html", str(page), "--a", "tiny@v0.2.0",
              "--b", "tiny@v0.3.0", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["compared"] == ["tiny@v0.2.0", "tiny@v0.3.0"] and data["name"] == "tiny"
    assert data["events"] >= 5 and data["size"] == page.stat().st_size


def test_layer_numbers_without_torch_match_the_diff_and_refuse_corruption(
    tmp_path: Path,
) -> None:
    import torch

    from modelver import CheckpointManager
    from modelver.checkpoint import format as fmt
    from modelver.diff import DiffSide, diff_checkpoints
    from modelver.errors import CheckpointCorruptedError
    from modelver.report import layers_of, measure_layers

    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.int64, torch.int8, torch.uint8, torch.bool,
              torch.complex64]

    def state(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for dt in dtypes:
            x = torch.randn(16, 9, generator=g) * 3
            x = torch.complex(x, x.flip(0)) if dt == torch.complex64 else x
            out[str(dt).removeprefix("torch.")] = (x > 0 if dt == torch.bool else x).to(dt)
        out["zeros"] = torch.zeros(5) if seed == 1 else torch.ones(5)  # A all zeros: no ratio
        out["same"] = torch.arange(7.0)
        return out

    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2):
        mgr.save(step, {"model": state(step)})
    mgr.close()
    a, b = DiffSide(tmp_path / "step-00000001", "a"), DiffSide(tmp_path / "step-00000002", "b")
    ours, theirs = measure_layers(a, b), layers_of(diff_checkpoints(a, b))
    assert [(t.tensor, t.status) for t in ours.tensors] == [
        (t.tensor, t.status) for t in theirs.tensors]
    changes = {t.tensor: t.change for t in ours.tensors}
    assert changes["model/same"] is None and changes["model/zeros"] is None
    for x, y in zip(ours.tensors, theirs.tensors, strict=True):
        if y.change is not None:
            assert x.change is not None and math.isclose(x.change, y.change, rel_tol=1e-9), x
    assert sum(t.change is not None for t in ours.tensors) == len(dtypes)

    assert b.path is not None
    entry = fmt.read_manifest(b.path).tensors["model/bfloat16"]
    for f, pos in ((b.path / entry.file, entry.offsets[0]), (b.path / fmt.STATE_FILE, 0)):
        raw = bytearray(f.read_bytes())
        raw[pos] ^= 0x01  # one flipped bit in a tensor read, or in state.json: refused
        f.write_bytes(bytes(raw))
        with pytest.raises(CheckpointCorruptedError, match="hash differs"):
            measure_layers(a, b)
        raw[pos] ^= 0x01
        f.write_bytes(bytes(raw))
