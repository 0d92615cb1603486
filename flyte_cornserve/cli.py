"""`cornserve`: the command line. Each subsystem contributes one click command or group."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """flyte-cornserve: serve multimodal ML pipelines on Flyte."""


def _register() -> None:
    # One line per subsystem; imports stay inside the subsystem's own cli module.
    from .executors.cli import executor
    from .models.cli import models
    from .services.cli import deploy, down, status, undeploy, up
    from .sidecar.cli import sidecar

    for command in (up, down, status, deploy, undeploy, sidecar, executor, models):
        main.add_command(command)


_register()
