"""The Redis namespace: the prefix of every key the stack writes, so that installations can share one Redis.

`$CORNSERVE_NAMESPACE` (default `cornserve`) is read on every call, not at import: a process's
environment decides, and the local backend passes it on to every child it starts. Each key is still
owned by one module (the protocol, the control plane, the batches, the sidecar directory); they all
build their keys here.
"""

from __future__ import annotations

import os
import re

ENV_NAMESPACE = "CORNSERVE_NAMESPACE"
DEFAULT_NAMESPACE = "cornserve"
PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # no ":": it separates the parts of a key


def current() -> str:
    """This process's namespace: `$CORNSERVE_NAMESPACE`, else `cornserve`."""
    return check(os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE)


def check(namespace: str) -> str:
    if not re.match(PATTERN, namespace):
        raise ValueError(f"{ENV_NAMESPACE}={namespace!r} must match {PATTERN}")
    return namespace


def key(*parts: str) -> str:
    """A key of this namespace: `<namespace>:<part>:<part>...`."""
    return ":".join((current(), *parts))
