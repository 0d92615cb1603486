"""The output identity of an encoder deployment: the half of a content-addressed id
(`protocol.content.content_id`) that says which computation made it.

It covers what changes the embeddings (the model id, the modality, the model's revision, the
versions of the code that computes them), never resources or options, so deployments that differ
only in those share their outputs. The other half, the input's content digest, never its path or
URL, makes a copy under another name, or the same image as a data: URL, a hit.
"""

from __future__ import annotations

import json
import os
import pathlib

import xxhash

#: A file up to this size counts by its contents (configs, processor and tokenizer files); a larger
#: one (weights) by its name and size, so that no weight is read to know the revision.
SMALL_FILE_BYTES = 1 << 20


def model_revision(model_dir: pathlib.Path) -> str:
    """xxh3-128 over the files of a model folder (hidden ones aside), by relative path: a small
    file's contents, a large one's size and, for a link, its target's name (the Hugging Face cache
    links each file to a blob named by its content's hash, so there a weights file counts by its
    content too).

    Cheap, and equal on every node holding the same files. Not seen: a weights file of a plain
    folder overwritten in place by one of exactly the same size (a fine-tune of the same
    architecture); put such a model in a new folder."""
    digest = xxhash.xxh3_128()
    files = (path for path in model_dir.rglob("*") if path.is_file())
    for path in sorted(files, key=lambda path: path.relative_to(model_dir).as_posix()):
        relative = path.relative_to(model_dir)
        if any(part.startswith(".") for part in relative.parts):  # download metadata, locks
            continue
        size = path.stat().st_size
        digest.update(f"{relative.as_posix()}\0{size}\0".encode())
        if size <= SMALL_FILE_BYTES:
            digest.update(path.read_bytes())
        elif path.is_symlink():
            digest.update(pathlib.Path(os.readlink(path)).name.encode())
    return digest.hexdigest()


def output_identity(model_id: str, modality: str, model_dir: pathlib.Path, encoder_version: int) -> str:
    """The output identity of an encoder deployment (JSON, readable in a log): model id, modality,
    the model's revision (`model_revision`), and the versions of what computes the embeddings (the
    encoder's own `encoder_version`, torch, transformers)."""
    import torch
    import transformers

    return json.dumps({"model": model_id, "modality": modality, "revision": model_revision(model_dir),
                       "encoder": encoder_version, "torch": torch.__version__,
                       "transformers": transformers.__version__}, sort_keys=True)
