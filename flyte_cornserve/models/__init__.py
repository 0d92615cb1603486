"""Model files: where a `model_id` lives on disk, and the tiny models the project builds itself."""

from .resolve import models_dir, resolve_model

__all__ = ["models_dir", "resolve_model"]
