"""Mirror modelver versions into an MLflow model registry (``modelver mlflow sync``).

Git tags stay the source of truth; MLflow gets a read-only copy for teams that browse models
there. Each ``NAME@vX.Y.Z`` becomes a version of the registered model NAME with its lineage as
version tags (``modelver.tag``, ``modelver.commit``, ``modelver.checkpoint``, metrics as
``metric.*``, the stage's params from ``dvc.lock`` as ``param.*``), and each GTO stage becomes
an alias. The ``modelver.tag`` version tag is the key, so syncing again updates in place and
never duplicates. Needs ``mlflow`` (or ``mlflow-skinny`` with SQLAlchemy for a SQLite store).

Tags are data anyone with push access wrote: a version whose tag is invalid (or whose commit's
``dvc.lock`` is refused) is skipped with a warning and reported in ``SyncResult.skipped``, never
half-synced; metrics go through :mod:`modelver.untrusted`, and a metric or param whose name
MLflow would refuse is left out (with a warning) instead of failing the whole sync.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelver import untrusted
from modelver import versions as v
from modelver.errors import ArtifactNotFoundError, ModelverError, ModelverWarning, clip
from modelver.gitrepo import GitRepo
from modelver.refs import artifacts_at, load_registry, open_git

TAG = "modelver.tag"  # the version tag that identifies a synced version
MANAGED_ALIASES = "modelver.aliases"  # registered-model tag: aliases this module set
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
# what MLflow accepts as a tag key (mlflow.utils.validation): checked here so that one odd
# metric or param name cannot fail the sync of every version
_TAG_KEY = re.compile(r"^[/\w.\- :]{1,250}$")
MAX_VALUE = 5000  # tag values and descriptions are clipped (MLflow stores at most 8000)
MAX_PARAM_DEPTH = 32  # params nested deeper are stored as text


@dataclass(frozen=True)
class SyncedVersion:
    tag: str
    model: str  # the registered model's name
    mlflow_version: str
    created: bool
    updated: bool  # tags or description changed on an existing version
    aliases: list[str]


@dataclass(frozen=True)
class SkippedVersion:
    tag: str
    reason: str  # why it was not synced (its tag or its commit's dvc.lock was refused)


@dataclass(frozen=True)
class SyncResult:
    tracking_uri: str
    registry_uri: str
    versions: list[SyncedVersion]
    removed_aliases: list[str]  # "model@alias" of stages no longer assigned
    skipped: list[SkippedVersion] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def model_name(artifact: str) -> str:
    """MLflow names cannot contain '/' (modelver names may): 'team/model' -> 'team-model'."""
    return artifact.replace("/", "-")


def alias_name(stage: str) -> str:
    """A stage as an MLflow alias: [A-Za-z0-9_-] only; 'latest' and 'vN' are reserved."""
    alias = re.sub(r"[^\w-]", "-", stage)
    return f"stage-{alias}" if _RESERVED_ALIAS.match(alias) else alias


def lineage_tags(ver: v.VersionTag, params: Mapping[str, Any]) -> dict[str, str]:
    """What reproduces the version: tag, commit, checkpoint hash, metrics, params.

    Refuses an invalid tag (:meth:`VersionTag.check`); leaves out, with a warning, a metric or
    param whose tag key MLflow would refuse; clips long values."""
    ver.check()
    meta = ver.meta
    metrics = untrusted.metrics(meta.get("metrics"), what=f"tag {ver.tag}")
    tags = {
        TAG: ver.tag,
        "modelver.name": ver.name,
        "modelver.version": str(ver.version),
        "modelver.commit": ver.commit,
        "modelver.date": ver.date,
        "modelver.stages": ",".join(ver.stages),
    }
    for key in ("checkpoint", "path", "step", "step_dir", "stage", "parent"):
        if meta.get(key) is not None:
            tags[f"modelver.{key}"] = str(meta[key])
    extra = {f"metric.{k}": repr(x) for k, x in sorted(metrics.items())}
    extra.update({f"param.{k}": str(x) for k, x in _flatten(params).items()})
    dropped = sorted(k for k in extra if not _key_ok(k))
    if dropped:
        warnings.warn(
            f"mlflow sync: {ver.tag}: left out {len(dropped)} metric/param name(s) MLflow "
            f"refuses, e.g. {clip(dropped[0], 60)}", ModelverWarning, stacklevel=2,
        )
    tags.update({k: x for k, x in extra.items() if _key_ok(k)})
    return {k: x[:MAX_VALUE] for k, x in tags.items()}


def _key_ok(key: str) -> bool:
    """A tag key MLflow accepts: its characters, at most 250 of them, a normalised path."""
    return bool(_TAG_KEY.match(key)) and not any(p in ("", ".", "..") for p in key.split("/"))


def _flatten(d: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, x in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(x, Mapping) and depth < MAX_PARAM_DEPTH:
            out.update(_flatten(x, key, depth + 1))
        else:
            out[key] = clip(x, MAX_VALUE) if isinstance(x, Mapping) else x
    return out


def _params(git: GitRepo, ver: v.VersionTag) -> dict[str, Any]:
    """The params the producing stage ran with, as dvc.lock records them (file -> values)."""
    from modelver.storage.dvcfile import find_locked_out

    path = ver.meta.get("path")
    if not path:
        art = artifacts_at(git, ver.commit).get(ver.name)
        path = art.path if art else None
    out = find_locked_out(git.read_file(ver.commit, "dvc.lock"), path) if path else None
    if out is None:
        return {}
    params = dict(out.params)
    main = params.pop("params.yaml", {})  # the default file: keys without a file prefix
    return {**main, **params}


def _description(ver: v.VersionTag) -> str:
    bits = [f"{ver.tag} at commit {ver.commit[:10]}"]
    if ver.step is not None:
        bits.append(f"step {ver.step}")
    if ver.metrics:
        bits.append(", ".join(f"{k}={x:.6g}" for k, x in sorted(ver.metrics.items())))
    tail = "\n\n" + "; ".join(bits) + " (synced by modelver)"
    return ver.message[: MAX_VALUE - len(tail)] + tail


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow and Alembic log schema migrations at INFO: keep the CLI's output clean."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def sync(
    name: str | None = None,
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    repo_root: str | Path = ".",
) -> SyncResult:
    """Create or update an MLflow model version per modelver version, and stage aliases."""
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError as e:
        raise ModelverError(
            "MLflow is not installed", hint="pip install 'modelver[mlflow]' (or mlflow)"
        ) from e
    git = open_git(repo_root)
    registry = load_registry(git)
    if name is not None:
        v.check_name(name, "artifact name")
        if not registry.of(name):
            raise ArtifactNotFoundError(name, known=registry.names())
    wanted, skipped = [], []
    for ver in registry.of(name) if name else registry.versions:
        try:
            ver.check()
        except ModelverError as e:
            skipped.append(_skip(ver, e))
        else:
            wanted.append(ver)
    with _quiet_mlflow():
        try:
            client = MlflowClient(
                tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri
            )
            synced, removed = [], []
            for artifact in sorted({x.name for x in wanted}):
                mine = [x for x in wanted if x.name == artifact]
                done, gone, bad = _sync_model(client, git, artifact, mine, MlflowException)
                synced += done
                removed += gone
                skipped += bad
        except ModelverError:
            raise
        except Exception as e:  # MLflow raises its own, SQLAlchemy's and OS errors alike
            text = e.message if isinstance(e, MlflowException) else str(e)
            line = (text.strip().splitlines() or [type(e).__name__])[0]
            raise ModelverError(
                f"MLflow registry error: {line}", hint="check --tracking-uri / --registry-uri"
            ) from e
    return SyncResult(
        str(client.tracking_uri), str(client._registry_uri), synced, removed, skipped
    )


def _skip(ver: v.VersionTag, e: ModelverError) -> SkippedVersion:
    """A version left out of the sync: warned about once, reported in the result."""
    warnings.warn(f"mlflow sync: skipped {ver.tag}: {e.message}", ModelverWarning, stacklevel=3)
    return SkippedVersion(ver.tag, e.message)


def _sync_model(
    client: Any,
    git: GitRepo,
    artifact: str,
    versions: list[v.VersionTag],
    not_ok: type[Exception],
) -> tuple[list[SyncedVersion], list[str], list[SkippedVersion]]:
    model = model_name(artifact)
    try:
        registered = client.get_registered_model(model)
    except not_ok as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        registered = client.create_registered_model(
            model,
            tags={"modelver.name": artifact},
            description=f"Model versions of the modelver artifact '{artifact}' (Git tags).",
        )
    existing = {
        mv.tags.get(TAG): mv
        for mv in client.search_model_versions(f"name='{model}'")
        if mv.tags.get(TAG)
    }
    numbers: dict[str, str] = {}
    results = []
    skipped = []
    kept = []
    for ver in versions:
        try:
            tags = lineage_tags(ver, _params(git, ver))
        except ModelverError as e:  # its commit's dvc.yaml/dvc.lock refused: sync the others
            skipped.append(_skip(ver, e))
            continue
        kept.append(ver)
        description = _description(ver)
        mv = existing.get(ver.tag)
        created = updated = False
        if mv is None:
            mv = client.create_model_version(
                model, source=f"modelver:{ver.tag}", tags=tags, description=description
            )
            created = True
        else:
            for k, val in tags.items():
                if mv.tags.get(k) != val:
                    client.set_model_version_tag(model, mv.version, k, val)
                    updated = True
            for k in set(mv.tags) - set(tags):  # a stage unassigned, a metric renamed
                if k.startswith(("modelver.", "metric.", "param.")):
                    client.delete_model_version_tag(model, mv.version, k)
                    updated = True
            if (mv.description or "") != description:
                client.update_model_version(model, mv.version, description=description)
                updated = True
        numbers[ver.tag] = str(mv.version)
        results.append(
            SyncedVersion(
                ver.tag,
                model,
                str(mv.version),
                created,
                updated,
                [alias_name(s) for s in ver.stages],
            )
        )
    return results, _sync_aliases(client, model, registered, kept, numbers), skipped


def _sync_aliases(
    client: Any,
    model: str,
    registered: Any,
    versions: list[v.VersionTag],
    numbers: Mapping[str, str],
) -> list[str]:
    """Set each stage's alias; drop aliases this module set for stages no longer assigned
    (aliases made by hand in MLflow are left alone)."""
    desired = {alias_name(s): numbers[x.tag] for x in versions for s in x.stages}
    current = {a: str(n) for a, n in (registered.aliases or {}).items()}
    for alias, number in desired.items():
        if current.get(alias) != number:
            client.set_registered_model_alias(model, alias, number)
    managed = {a for a in (registered.tags or {}).get(MANAGED_ALIASES, "").split(",") if a}
    removed = sorted(a for a in managed - set(desired) if a in current)
    for alias in removed:
        client.delete_registered_model_alias(model, alias)
    value = ",".join(sorted(desired))
    if (registered.tags or {}).get(MANAGED_ALIASES) != value:
        client.set_registered_model_tag(model, MANAGED_ALIASES, value)
    return [f"{model}@{a}" for a in removed]
