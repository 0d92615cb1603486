"""A Hugging Face model id -> its snapshot folder in the Hugging Face cache, downloaded into that
cache first if it is not there (an executor reports that as its "downloading the model" phase).

huggingface_hub reads its settings from the environment when it is imported, and this module uses
them as they are: the cache (`HF_HOME`, or `HF_HUB_CACHE` for its hub part), `HF_HUB_OFFLINE=1` (the
cache only, never the network), `HF_TOKEN` (gated and private models), `HF_ENDPOINT` (another hub or
a mirror). On a cluster the executor pod sets HF_HOME to a node-local folder that the node's
executors share, and HF_TOKEN from the optional Secret `cornserve-hf-token`.

A model found in the cache is used as it is there, with no look-up on the hub: a start does not
depend on the hub once a node has the model, and a node's executors run the same revision. To take
a newer revision, remove the model from the cache (`hf cache`). A snapshot that an interrupted
download left incomplete is not "found": huggingface_hub records the file list before it downloads,
and the download resumes.

Executors of one node that download the same model at once need no locking of their own:
huggingface_hub takes a file lock per file in the cache (`<cache>/.locks/`), writes each file to a
temporary file of its own and renames it into place, so the second waits for the first's file and
then uses it.
"""

from __future__ import annotations

import logging
import pathlib

from flyte_cornserve.phases import DOWNLOADING_MODEL, phase

from .resolve import ModelNotFoundError

log = logging.getLogger(__name__)

TOKEN_ADVICE = "HF_TOKEN (on a cluster: the Secret cornserve-hf-token, key token)"


def hub_model(model_id: str) -> pathlib.Path:
    """The cached snapshot of `model_id`, downloaded first unless it is cached or HF_HUB_OFFLINE is set;
    `ModelNotFoundError` saying what to set if it is neither cached nor can be downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return pathlib.Path(snapshot_download(model_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.is_offline_mode():
        raise ModelNotFoundError(
            f"{_not_cached(model_id)} and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so only that cache "
            f"was looked at. Put the model in that cache beforehand ({_fill(model_id)}), give the path of a "
            f"local folder as model_id, or unset HF_HUB_OFFLINE to download it; a gated or private model also "
            f"needs {TOKEN_ADVICE}."
        )
    log.info("downloading %s from %s into %s", model_id, constants.ENDPOINT, constants.HF_HUB_CACHE)
    try:
        with phase(DOWNLOADING_MODEL):
            return pathlib.Path(snapshot_download(model_id))
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise ModelNotFoundError(f"{_not_cached(model_id)} and could not be downloaded: {_why(model_id, exc)}") from None


def _why(model_id: str, exc: Exception) -> str:
    """What went wrong with the download, and what to set. huggingface_hub raises the hub's refusals
    (missing, gated, 401) as they are and wraps the rest (no connection, a timeout, other HTTP
    errors) in a `LocalEntryNotFoundError` whose cause is the original error."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    hub = f"the hub at {constants.ENDPOINT}"
    token = "with the token in HF_TOKEN" if get_token() else "without a token (HF_TOKEN is not set)"
    error = exc.__cause__ if not isinstance(exc, HfHubHTTPError) and exc.__cause__ is not None else exc
    if isinstance(error, GatedRepoError):
        return (f"{hub} refused it {token}: it is gated ({_brief(error)}). Set {TOKEN_ADVICE} to a token "
                f"of an account that was granted access to it on the hub.")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{hub} has no model {model_id!r} that can be read {token} ({_brief(error)}). Check the model "
                f"id; a private or gated model needs {TOKEN_ADVICE}.")
    if isinstance(error, HfHubHTTPError) and error.response.status_code in (401, 403):
        return f"{hub} refused the request {token} ({_brief(error)}). Set {TOKEN_ADVICE} to a token that may read it."
    if isinstance(error, HfHubHTTPError):
        return f"{hub} answered with an error ({_brief(error)}). Try again later, or {_instead(model_id)}."
    return (f"{hub} could not be reached ({_brief(error)}). Check the network and HF_ENDPOINT "
            f"(another hub or a mirror), or {_instead(model_id)}.")


def _not_cached(model_id: str) -> str:
    from huggingface_hub import constants

    return (f"model {model_id!r} is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"(HF_HOME, or HF_HUB_CACHE, sets where it is)")


def _fill(model_id: str) -> str:
    return f"`hf download {model_id}` with the same HF_HOME, where the hub is reachable"


def _instead(model_id: str) -> str:
    return f"put the model in that cache beforehand ({_fill(model_id)}), or give the path of a local folder as model_id"


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
