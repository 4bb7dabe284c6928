"""What the checkpoint core asks of DVC's state: the MD5s a writer computed from memory, and
whether a run's files are stored anywhere but the workspace.

:class:`DvcHashState` pre-fills DVC's hash state so ``dvc commit``/``dvc repro`` does not read
every checkpoint byte again to hash it: a :class:`~modelver.checkpoint.hooks.CommitHook` (the
manager's ``dvc_hashes`` option). DVC is imported by :mod:`modelver.storage.dvc` in a background
thread at construction: importing it and opening the repository takes seconds, which the first
save should not pay.

:func:`saved_elsewhere` answers the core's ``saved_elsewhere`` question (``keep_runs``).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from modelver.checkpoint import format as fmt
from modelver.errors import ModelverWarning
from modelver.hashing import md5_file


class DvcHashState:
    def __init__(self, root: Path, _value: Any = True) -> None:
        self._available = importlib.util.find_spec("dvc") is not None
        self._warm: threading.Thread | None = None
        if self._available:
            self._warm = threading.Thread(
                target=_warm, args=(root,), name="modelver-dvc-warm", daemon=True
            )
            self._warm.start()

    def committed(self, path: Path, manifest: fmt.Manifest) -> None:
        md5s = {name: e.md5 for name, e in manifest.files.items() if e.md5}
        if not md5s or not self._available:
            return
        if self._warm is not None:
            self._warm.join()
        try:
            md5s[fmt.MANIFEST] = md5_file(path / fmt.MANIFEST)
            from modelver.storage.dvc import record_hashes

            record_hashes(path, md5s)
        except Exception as e:  # an optimisation only: DVC then hashes the files itself
            # (OSError: committed already, e.g. retired at once by another manager)
            warnings.warn(
                f"could not record checkpoint hashes for DVC ({e}); DVC will hash the files",
                ModelverWarning,
                stacklevel=3,
            )

    def check(self) -> None:
        """Nothing to report: a failure is a warning, DVC then hashes the files itself."""

    def close(self) -> None:
        if self._warm is not None:
            self._warm.join()


def _warm(directory: Path) -> None:
    here = Path(os.path.realpath(directory))
    existing = next((d for d in (here, *here.parents) if d.is_dir()), here)
    try:
        from modelver.storage.dvc import record_hashes

        record_hashes(existing, {})
    except Exception:  # the first real record reports any problem
        pass


def saved_elsewhere(path: Path) -> bool:
    """Every file under ``path`` is in the DVC cache, or else in the default remote: removing
    it from the workspace loses nothing. False without DVC, outside a DVC repository, or when
    DVC cannot tell (a remote out of reach): then nothing is removed."""
    if importlib.util.find_spec("dvc") is None:
        return False
    from modelver.storage.dvc import DvcStorage, find_root

    here = Path(os.path.realpath(path))
    try:
        st = DvcStorage(find_root(here))
    except Exception:  # not a DVC repository, or one DVC cannot open: keep everything
        return False
    try:
        unsaved = st.workspace_unsaved(os.path.relpath(here, st.root))
        if not unsaved:
            return True
        return st.default_remote() is not None and not st.missing_in_remote(unsaved)
    except Exception:  # DVC raises what it meets (a remote down, a file vanishing): keep it
        return False
    finally:
        st.close()
