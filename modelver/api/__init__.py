"""The operations behind the ``modelver`` commands, as plain typed functions.

Nothing here prints or exits: results are frozen dataclasses, problems are ``modelver.errors``.
dvc and torch are imported inside the functions that need them so ``modelver list`` stays fast.
"""

from modelver.api.check import check
from modelver.api.data import checkout, pull, push, resume, verify
from modelver.api.diff import diff
from modelver.api.mlflow import mlflow_sync
from modelver.api.recovery import RecoverResult, list_runs, recover
from modelver.api.versions import (
    CheckoutResult,
    FileInfo,
    InitResult,
    PromoteResult,
    ResumeResult,
    TagResult,
    TransferResult,
    VersionDetails,
    VersionInfo,
    init,
    list_versions,
    promote,
    show,
    tag,
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
