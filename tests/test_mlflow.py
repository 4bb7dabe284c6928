"""`modelver mlflow sync` against a local SQLite-backed MLflow model registry."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from modelver.errors import ModelverWarning
from tests.helpers import git, one_error_line, run, set_params, train_and_commit

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")

from mlflow import MlflowClient

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # MLflow's


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def two_versions(project: Path) -> Path:
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    assert run(project, "promote", "tiny@v0.1.0", "prod", "-q").exit_code == 0
    set_params(project, steps=30, lr=0.01)
    train_and_commit(project, "train to 30")
    assert run(project, "tag", "tiny@v0.2.0", "-q").exit_code == 0
    return project


def sync(root: Path, uri: str, *args: str) -> dict:
    res = run(root, "mlflow", "sync", "--tracking-uri", uri, "--json", *args)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


def by_tag(client: MlflowClient) -> dict[str, object]:
    return {mv.tags["modelver.tag"]: mv for mv in client.search_model_versions("name='tiny'")}


def test_sync_registers_lineage_and_stage_aliases(two_versions: Path, uri: str) -> None:
    data = sync(two_versions, uri)
    assert [(v["tag"], v["mlflow_version"], v["created"]) for v in data["versions"]] == [
        ("tiny@v0.1.0", "1", True), ("tiny@v0.2.0", "2", True)]
    client = MlflowClient(tracking_uri=uri)
    versions = by_tag(client)
    v1 = versions["tiny@v0.1.0"]
    v2 = versions["tiny@v0.2.0"]
    head = git(two_versions, "rev-parse", "HEAD")
    assert v2.tags["modelver.commit"] == head and v1.tags["modelver.commit"] != head
    shown = json.loads(run(two_versions, "show", "tiny@v0.2.0", "--json").stdout)
    assert v2.tags["modelver.checkpoint"] == shown["checkpoint_hash"]
    assert v2.tags["modelver.step"] == "30" and v2.tags["modelver.parent"] == "v0.1.0"
    assert float(v2.tags["metric.loss"]) == pytest.approx(shown["metrics"]["loss"])
    assert (v1.tags["param.train.lr"], v2.tags["param.train.lr"]) == ("0.05", "0.01")
    assert v1.tags["modelver.stages"] == "prod" and "tiny@v0.2.0 at commit" in v2.description
    assert client.get_model_version_by_alias("tiny", "prod").version == v1.version


def test_resync_is_idempotent_and_follows_stages(two_versions: Path, uri: str) -> None:
    sync(two_versions, uri)
    client = MlflowClient(tracking_uri=uri)
    client.set_registered_model_alias("tiny", "by-hand", "1")  # not modelver's: kept
    again = sync(two_versions, uri)
    assert [(v["created"], v["updated"]) for v in again["versions"]] == [(False, False)] * 2
    assert len(client.search_model_versions("name='tiny'")) == 2
    assert run(two_versions, "promote", "tiny@v0.2.0", "prod", "-q").exit_code == 0
    assert run(two_versions, "promote", "tiny@v0.2.0", "staging", "-q").exit_code == 0
    moved = sync(two_versions, uri, "tiny")
    assert [(v["created"], v["updated"]) for v in moved["versions"]] == [(False, True)] * 2
    assert str(client.get_model_version_by_alias("tiny", "prod").version) == "2"
    assert by_tag(client)["tiny@v0.1.0"].tags.get("modelver.stages", "") == ""
    # GTO's unassignment tag (NAME#STAGE!#N) drops the alias modelver had set
    git(two_versions, "tag", "-a", "tiny#staging!#5", "-m", "unassign", "HEAD")
    gone = sync(two_versions, uri)
    assert gone["removed_aliases"] == ["tiny@staging"]
    aliases = client.get_registered_model("tiny").aliases
    assert set(aliases) == {"prod", "by-hand"} and len(client.search_model_versions("")) == 2


def test_sync_errors_are_one_line(two_versions: Path, uri: str, tmp_path: Path) -> None:
    res = run(two_versions, "mlflow", "sync", "nope", "--tracking-uri", uri)
    assert res.exit_code == 1 and "'nope' is not an artifact" in one_error_line(res)
    res = run(tmp_path, "mlflow", "sync", "--tracking-uri", uri)
    assert res.exit_code == 1 and "not inside a Git repository" in one_error_line(res)
    res = run(two_versions, "mlflow", "sync", "--tracking-uri", "sqlite:////proc/no/such.db")
    assert res.exit_code == 1 and "MLflow" in one_error_line(res)


def test_names_and_aliases_mlflow_accepts() -> None:
    from modelver.integrations.mlflow import alias_name, model_name

    assert model_name("team/digits") == "team-digits"
    assert [alias_name(s) for s in ("prod", "eu/prod", "latest", "v2")] == [
        "prod", "eu-prod", "stage-latest", "stage-v2"]


def _craft(root: Path, tag: str, meta: object) -> None:
    line = meta if isinstance(meta, str) else json.dumps(meta)
    git(root, "tag", "-a", tag, "-m", f"crafted\n\nmodelver: {line}", "HEAD")


def test_invalid_tags_are_skipped_with_their_reason(project: Path, uri: str) -> None:
    """A crafted tag (issue 11) is reported and left out; the valid versions still sync."""
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    _craft(project, "tiny@v0.2.0", {"step": "notanint"})
    _craft(project, "tiny@v0.3.0", {"metrics": {"loss": "abc"}})  # no float() of it
    _craft(project, "tiny@v0.4.0", {"path": "../victim"})
    _craft(project, "tiny@v0.5.0", {"metrics": {"loss": 0.5, "bad/../name": 1, "sp\nace": 2,
                                                "ok.name": float("nan")}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(project, "mlflow", "sync", "--tracking-uri", uri, "--json")
    assert res.exit_code == 0, res.stderr
    said = " | ".join(str(w.message) for w in caught if w.category is ModelverWarning)
    data = json.loads(res.stdout)
    assert [v["tag"] for v in data["versions"]] == ["tiny@v0.1.0", "tiny@v0.5.0"]
    reasons = {s["tag"]: s["reason"] for s in data["skipped"]}
    assert set(reasons) == {"tiny@v0.2.0", "tiny@v0.3.0", "tiny@v0.4.0"}
    assert "notanint" in reasons["tiny@v0.2.0"] and "abc" in reasons["tiny@v0.3.0"]
    assert "../victim" in reasons["tiny@v0.4.0"]
    assert "skipped tiny@v0.2.0" in said and "left out 2" in said
    v5 = by_tag(MlflowClient(tracking_uri=uri))["tiny@v0.5.0"]
    metrics = {k: x for k, x in v5.tags.items() if k.startswith("metric.")}
    assert metrics == {"metric.loss": "0.5", "metric.ok.name": "nan"}


def test_lineage_tags_refuse_an_invalid_tag() -> None:
    from modelver import versions as v
    from modelver.errors import MalformedDataError
    from modelver.gitrepo import TagRecord
    from modelver.integrations.mlflow import lineage_tags

    rec = TagRecord("tiny@v1.0.0", True, "c" * 40, "2024-01-01",
                    'x\n\nmodelver: {"metrics": {"loss": "NaN-ish"}}')
    (ver,) = v.build_registry([rec]).versions
    with pytest.raises(MalformedDataError, match="NaN-ish"):
        lineage_tags(ver, {})
