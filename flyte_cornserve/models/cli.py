"""`cornserve models build-tiny`: build the project's tiny models into $CORNSERVE_HOME/models."""

from __future__ import annotations

import click

from .resolve import models_dir


@click.group()
def models() -> None:
    """Model files used by executors."""


@models.command("build-tiny")
@click.option("--seed", default=0, show_default=True, help="same seed, same model files")
@click.option("--force", is_flag=True, help="rebuild even if already built")
@click.argument("names", nargs=-1)
def build_tiny_command(seed: int, force: bool, names: tuple[str, ...]) -> None:
    """Build NAMES (default: all tiny models): a trained tokenizer, a tiny Llava VLM, a tiny Llama."""
    from .tiny import TINY_MODELS, build_tiny

    for name in names or tuple(TINY_MODELS):
        if name not in TINY_MODELS:
            raise click.BadParameter(f"{name!r}; tiny models: {', '.join(TINY_MODELS)}", param_hint="NAMES")
        click.echo(f"building {name} ...")
        click.echo(f"{name}: {build_tiny(name, models_dir(), seed=seed, force=force)}")
