"""`model_id` -> a local folder that transformers and vLLM can load.

A path to a folder is used as it is. The names of the project's tiny models (`tiny-llava`,
`tiny-llama`) resolve to `$CORNSERVE_HOME/models/<name>`, built on first use (an executor reports
that as its "building the model" phase). Anything else is a
Hugging Face model id, resolved from the local Hugging Face cache (no hub is reachable here).
"""

from __future__ import annotations

import logging
import pathlib

from flyte_cornserve.home import cornserve_home
from flyte_cornserve.phases import BUILDING_MODEL, phase

log = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """`model_id` names no folder, no tiny model and nothing in the local Hugging Face cache."""


def models_dir() -> pathlib.Path:
    return cornserve_home() / "models"


def resolve_model(model_id: str, build: bool = True) -> pathlib.Path:
    from .tiny import TINY_MODELS, build_tiny

    path = pathlib.Path(model_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if model_id in TINY_MODELS:
        target = models_dir() / model_id
        if not (target / "config.json").exists():
            if not build:
                raise ModelNotFoundError(f"tiny model {model_id!r} is not built yet: run `cornserve models build-tiny`")
            log.info("building tiny model %s into %s (first use, about 30 s)", model_id, models_dir())
            with phase(BUILDING_MODEL):  # or waiting for another process that builds it
                build_tiny(model_id, models_dir())
        return target
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:  # the hub client raises several kinds for "not there"
        raise ModelNotFoundError(
            f"model {model_id!r} is neither a folder, a tiny model ({', '.join(TINY_MODELS)}) nor in the "
            f"local Hugging Face cache: {exc}"
        ) from None
