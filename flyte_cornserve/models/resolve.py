"""`model_id` -> a local folder that transformers and vLLM can load.

A path to a folder is used as it is. The names of the project's tiny models (`tiny-llava`,
`tiny-llama`) resolve to `$CORNSERVE_HOME/models/<name>`, built on first use (an executor reports
that as its "building the model" phase). Anything else is a
Hugging Face model id: its snapshot in the Hugging Face cache, downloaded there first if it is not
cached (`hub.py`; an executor reports that as its "downloading the model" phase).
"""

from __future__ import annotations

import logging
import pathlib

from flyte_cornserve.home import cornserve_home
from flyte_cornserve.phases import BUILDING_MODEL, phase

log = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """`model_id` names no folder, no tiny model, and no Hugging Face model that is cached or could be
    downloaded; the message says what to set."""


def models_dir() -> pathlib.Path:
    return cornserve_home() / "models"


def resolve_model(model_id: str) -> pathlib.Path:
    from .tiny import TINY_MODELS, build_tiny

    path = pathlib.Path(model_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if model_id in TINY_MODELS:
        target = models_dir() / model_id
        if not (target / "config.json").exists():
            log.info("building tiny model %s into %s (first use, about 30 s)", model_id, models_dir())
            with phase(BUILDING_MODEL):  # or waiting for another process that builds it
                build_tiny(model_id, models_dir())
        return target
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from .hub import hub_model

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise ModelNotFoundError(
            f"model {model_id!r} is neither a folder, a tiny model ({', '.join(TINY_MODELS)}) nor a Hugging Face "
            f"model id ('name' or 'org/name')"
        ) from None
    return hub_model(model_id)
