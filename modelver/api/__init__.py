"""The operations behind the ``modelver`` commands, as plain typed functions.

Nothing here prints or exits: results are frozen dataclasses, problems are ``modelver.errors``.
dvc and torch are imported inside the functions that need them so ``modelver list`` stays fast.
"""

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
