"""The operations behind the ``modelver`` commands, as plain typed functions.

Nothing here prints or exits: results are frozen dataclasses, problems are ``modelver.errors``.
dvc and torch are imported inside the functions that need them so ``modelver list`` stays fast.
"""

from modelver.api.compare import diff
from modelver.api.data import checkout, pull, push, resume, verify
from modelver.api.gate import check, mlflow_sync
from modelver.api.recovery import RecoverResult, list_runs, recover
from modelver.api.registry import (
    CheckoutResult,
    FileInfo,
    InitResult,
    PromoteResult,
    ResumeResult,
    TagResult,
    TransferResult,
    VersionDetails,
    VersionInfo,
    default_remote_dir,
    init,
    list_versions,
    promote,
    show,
    tag,
)
from modelver.integrity import VerifyResult
from modelver.params import parse_override
from modelver.refs import ResolvedRef, checkpoint_dir_for, resolve_ref

__all__ = [
    "CheckoutResult",
    "FileInfo",
    "InitResult",
    "PromoteResult",
    "RecoverResult",
    "ResolvedRef",
    "ResumeResult",
    "TagResult",
    "TransferResult",
    "VerifyResult",
    "VersionDetails",
    "VersionInfo",
    "check",
    "checkout",
    "checkpoint_dir_for",
    "default_remote_dir",
    "diff",
    "init",
    "list_runs",
    "list_versions",
    "mlflow_sync",
    "parse_override",
    "promote",
    "pull",
    "push",
    "recover",
    "resolve_ref",
    "resume",
    "show",
    "tag",
    "verify",
]
