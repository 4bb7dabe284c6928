"""Project fixtures for the registry tests (a pytest plugin: ``pytest_plugins``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelver import api
from tests.registry_helpers import make_project


@pytest.fixture(scope="session")
def template_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built once per session (training is the slow part); tests get copies."""
    home = tmp_path_factory.mktemp("template-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("XDG_CACHE_HOME", str(home / ".cache"))
        mp.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        for k in ("AUTHOR", "COMMITTER"):
            mp.setenv(f"GIT_{k}_NAME", "modelver tests")
            mp.setenv(f"GIT_{k}_EMAIL", "tests@modelver.invalid")
        (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")
        yield make_project(tmp_path_factory.mktemp("template") / "proj")


@pytest.fixture
def project(template_project: Path, tmp_path: Path) -> Path:
    """A private copy of the template with its own default remote (under this test's HOME)."""
    root = tmp_path / "proj"
    shutil.copytree(template_project, root, symlinks=True)
    (root / ".dvc" / "config.local").unlink()
    shutil.rmtree(root / ".dvc" / "tmp", ignore_errors=True)
    api.init(root)
    return root
