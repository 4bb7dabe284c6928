"""The operations behind the ``modelver`` commands, as plain typed functions.

Nothing here prints or exits: results are frozen dataclasses, problems are ``modelver.errors``.
Each name loads its module on first use (``modelver.api.history`` imports neither dvc nor the
diff's modules), and dvc and torch are imported inside the functions that need them, so a
command pays only for what it runs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelver.api.check import check
    from modelver.api.data import checkout, pull, push, resume, verify
    from modelver.api.diff import diff
    from modelver.api.export import export
    from modelver.api.history import HistoryEvent, history
    from modelver.api.mlflow import mlflow_sync
    from modelver.api.recovery import RecoverResult, list_runs, recover
    from modelver.api.report import ReportResult, report, write_diff_html
    from modelver.api.versions import (
        CheckoutResult,
        DeprecateResult,
        FileInfo,
        InitResult,
        PromoteResult,
        ResumeResult,
        TagResult,
        TransferResult,
        UnassignResult,
        VersionDetails,
        VersionInfo,
        deprecate,
        init,
        list_versions,
        promote,
        show,
        tag,
        unassign,
    )
    from modelver.integrity import VerifyResult
    from modelver.materialize import checkpoint_dir_for
    from modelver.params import parse_override
    from modelver.refs import ResolvedRef, resolve_ref
    from modelver.storage import BACKENDS
    from modelver.storage.dvcfile import default_remote_dir

# name -> the module that defines it
_WHERE = {
    "BACKENDS": "modelver.storage",
    "CheckoutResult": "modelver.api.versions",
    "DeprecateResult": "modelver.api.versions",
    "FileInfo": "modelver.api.versions",
    "HistoryEvent": "modelver.api.history",
    "InitResult": "modelver.api.versions",
    "PromoteResult": "modelver.api.versions",
    "RecoverResult": "modelver.api.recovery",
    "ReportResult": "modelver.api.report",
    "ResolvedRef": "modelver.refs",
    "ResumeResult": "modelver.api.versions",
    "TagResult": "modelver.api.versions",
    "TransferResult": "modelver.api.versions",
    "UnassignResult": "modelver.api.versions",
    "VerifyResult": "modelver.integrity",
    "VersionDetails": "modelver.api.versions",
    "VersionInfo": "modelver.api.versions",
    "check": "modelver.api.check",
    "checkout": "modelver.api.data",
    "checkpoint_dir_for": "modelver.materialize",
    "default_remote_dir": "modelver.storage.dvcfile",
    "deprecate": "modelver.api.versions",
    "diff": "modelver.api.diff",
    "export": "modelver.api.export",
    "history": "modelver.api.history",
    "init": "modelver.api.versions",
    "list_runs": "modelver.api.recovery",
    "list_versions": "modelver.api.versions",
    "mlflow_sync": "modelver.api.mlflow",
    "parse_override": "modelver.params",
    "promote": "modelver.api.versions",
    "pull": "modelver.api.data",
    "push": "modelver.api.data",
    "recover": "modelver.api.recovery",
    "report": "modelver.api.report",
    "resolve_ref": "modelver.refs",
    "resume": "modelver.api.data",
    "show": "modelver.api.versions",
    "tag": "modelver.api.versions",
    "unassign": "modelver.api.versions",
    "verify": "modelver.api.data",
    "write_diff_html": "modelver.api.report",
}
__all__ = [
    "BACKENDS",
    "CheckoutResult",
    "DeprecateResult",
    "FileInfo",
    "HistoryEvent",
    "InitResult",
    "PromoteResult",
    "RecoverResult",
    "ReportResult",
    "ResolvedRef",
    "ResumeResult",
    "TagResult",
    "TransferResult",
    "UnassignResult",
    "VerifyResult",
    "VersionDetails",
    "VersionInfo",
    "check",
    "checkout",
    "checkpoint_dir_for",
    "default_remote_dir",
    "deprecate",
    "diff",
    "export",
    "history",
    "init",
    "list_runs",
    "list_versions",
    "mlflow_sync",
    "parse_override",
    "promote",
    "pull",
    "push",
    "recover",
    "report",
    "resolve_ref",
    "resume",
    "show",
    "tag",
    "unassign",
    "verify",
    "write_diff_html",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'modelver.api' has no attribute {name!r}")


class _Api(types.ModuleType):
    """Some names are also their module's (``diff``, in ``modelver.api.diff``): importing the
    module would set the name to it, so that assignment of the import system is dropped and
    the name stays the function, found by ``__getattr__``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _WHERE and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Api
