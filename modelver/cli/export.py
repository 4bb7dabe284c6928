"""``modelver export``: a checkpoint's weights as safetensors files or a Hugging Face directory."""

from __future__ import annotations

import re
from typing import Any

import click

from modelver.cli.diff import human_bytes
from modelver.cli.output import echo_json, json_option, progress, quiet_option

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


class ByteSize(click.ParamType):
    """A size as Hugging Face writes it: ``5GB`` (10^9), ``500MiB`` (2^20), or bytes."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS or int(m.group(1)) < 1:
            self.fail(f"{value!r} is not a size (for example 5GB, 500MB, 2GiB)", param, ctx)
        return int(m.group(1)) * _UNITS[unit]


@click.command("export")
@click.argument("ref")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False),
              help="Directory to write (new or empty; --force replaces an earlier export).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "hf"]), default="safetensors",
              show_default=True,
              help="safetensors: model.safetensors (or shards); hf: with config.json for "
              "from_pretrained.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Cast floating tensors (default: as saved).")
@click.option("--component", default="model", show_default=True,
              help="Which component's tensors to export.")
@click.option("--max-shard-size", type=ByteSize(), default="5GB", show_default=True,
              help="Past this many tensor bytes a file, shards and an index are written.")
@click.option("--force", is_flag=True, help="Replace an earlier export in the directory.")
@json_option
@quiet_option
def export(
    ref: str, to: str, fmt: str, dtype: str | None, component: str, max_shard_size: int,
    force: bool, as_json: bool, quiet: bool,
) -> None:
    """Export REF's weights (no optimizer state) for serving and sharing.

    REF is a version (NAME@vX.Y.Z, NAME, NAME#STAGE), a commit, a DVC experiment or a
    checkpoint directory. Plain, delta, DDP and sharded (FSDP2/DCP) checkpoints all export to
    full tensors under their state-dict keys; every byte read is checked against the
    manifest, and the files record the version, commit and checkpoint hash.
    """
    from modelver import api

    with progress("export", quiet=quiet or as_json) as on_progress:
        result = api.export(
            ref, to=to, format=fmt, dtype=dtype, component=component,
            max_shard_size=max_shard_size, force=force, progress=on_progress,
        )
    if as_json:
        echo_json(result.to_json())
    elif not quiet:
        files = ", ".join(f.name for f in result.files)
        click.echo(
            f"exported {ref} (step {result.step}) {result.component}: {result.tensors} tensors, "
            f"{human_bytes(result.total_size)} -> {result.path} ({files})"
        )


COMMANDS = [export]
