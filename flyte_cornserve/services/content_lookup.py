"""The submitting side of content addressing: before the batch runner queues work for a
content-addressed unit task (`TaskExecutionDescriptor.input_content`), it computes the digest of
each item's input, joins items with equal inputs into one, and looks the outputs up (the ids an
executor would give them, `protocol.content.content_id`): an output already stored is pinned for the
item's consumers and is its output at once, so a known image, or a copy of one under a new path, is
never queued.

Only content that can be read here is looked up: text, and local files (a path or `file://`; on a
cluster the control plane may not see the executors' files, and then this finds nothing). Remote
objects and data: URLs go to the executor, which finds them by content too (a hit there saves the
encode, not the fetch).
"""

from __future__ import annotations

import pathlib
import urllib.parse

from flyte_cornserve.protocol.content import content_digest, tensor_source
from flyte_cornserve.task import TensorRef


def input_digest(content: bytes | str) -> str | None:
    """The digest of an input's content: inline bytes, or a local file's (None where it cannot be read here)."""
    if isinstance(content, bytes):
        return content_digest(content)
    path = _local_path(content)
    if path is None:
        return None
    try:
        return content_digest(path.read_bytes())
    except OSError:  # missing, unreadable: the executor reports it, naming the reference
        return None


def _local_path(reference: str) -> pathlib.Path | None:
    if reference.startswith("file://"):
        return pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(reference).path))
    if "://" in reference or reference.startswith("data:"):
        return None
    return pathlib.Path(reference).expanduser()


def with_source(ref: TensorRef, producer_json: str, content: bytes | str, digest: str) -> TensorRef:
    """`ref` as the output of an item whose input is `content`: its source names that item's input
    and the producer (`UnitTask.compact_json()`)."""
    reference = content if isinstance(content, str) else None
    return ref.model_copy(update={"source": tensor_source(producer_json, reference, digest)})
