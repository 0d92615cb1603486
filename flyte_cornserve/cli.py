"""`cornserve`: the command line. Each subsystem contributes one click command or group."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """flyte-cornserve: serve multimodal ML pipelines on Flyte."""


def _register() -> None:
    # One line per subsystem; imports stay inside the subsystem's own cli module.
    from .sidecar.cli import sidecar

    main.add_command(sidecar)


_register()
