"""`cornserve sidecar`: run this node's sidecar until SIGTERM or SIGINT."""

from __future__ import annotations

import ipaddress
import logging
import os
import pathlib
import re
import signal
import socket
import threading

import click

from .. import redis_server
from ..launch import announce_ready
from ..namespace import DEFAULT_NAMESPACE, ENV_NAMESPACE
from .directory import ENV_SIDECAR_ID, Directory, default_sidecar_id
from .errors import SidecarError
from .server import SidecarConfig, SidecarServer
from .wire import ENV_TOKEN

_ALL_INTERFACES = {"0.0.0.0", "::", ""}
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


class ByteSize(click.ParamType):
    """A byte count such as `1073741824`, `512MiB` or `4GiB`."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size such as 512MiB or 4GiB", param, ctx)
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@click.command()
@click.option("--id", "sidecar_id", envvar=ENV_SIDECAR_ID, default=default_sidecar_id, show_default="host name",
              help="Unique name of this sidecar; clients on this node use the same one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port to listen on; 0 picks a free one (clients and peers find it in Redis).")
@click.option("--advertise-host", default=None, help="Address other nodes use to reach this sidecar [default: --host].")
@click.option("--memory-cap", type=ByteSize(), default=None,
              help="Shared memory for tensors, e.g. 8GiB [default: half of the shm filesystem].")
@click.option("--shm-dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("/dev/shm"), show_default=True, help="A tmpfs folder for the arena.")
@click.option("--token", envvar=ENV_TOKEN, default="", show_default=False,
              help=f"Shared secret required from clients and peer sidecars (better: ${ENV_TOKEN}).")
@click.option("--namespace", envvar=ENV_NAMESPACE, default=DEFAULT_NAMESPACE, show_default=True, help="Prefix of the Redis keys.")
@click.option("--heartbeat-ttl", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Seconds without a heartbeat after which consumers consider this sidecar dead.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of Prometheus /metrics; 0 picks a free one (advertised in Redis). On 127.0.0.1 unless "
                   "$CORNSERVE_METRICS_HOST says otherwise.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO", show_default=True)
def sidecar(
    sidecar_id: str,
    host: str,
    port: int,
    advertise_host: str | None,
    memory_cap: int | None,
    shm_dir: pathlib.Path,
    token: str,
    namespace: str,
    heartbeat_ttl: float,
    metrics_port: int,
    log_level: str,
) -> None:
    """Run the tensor sidecar of this node: it holds tensors in shared memory and serves them to peers."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if host in _ALL_INTERFACES and not advertise_host:
        raise click.BadParameter(f"listening on {host!r} needs --advertise-host: the address other nodes reach this one at", param_hint="--host")
    if not token and not _is_loopback(host):
        raise click.BadParameter(
            f"listening on {host!r} (beyond loopback) needs a shared token, or anyone who reaches the port can read "
            f"and write tensors: set ${ENV_TOKEN} (or --token) here and for every client and peer sidecar",
            param_hint="--host",
        )
    shm_size = _filesystem_size(shm_dir)
    capacity = memory_cap if memory_cap is not None else shm_size // 2
    if capacity > shm_size:
        raise click.BadParameter(f"{capacity} bytes exceed the {shm_size}-byte filesystem of {shm_dir}", param_hint="--memory-cap")
    embedded = not os.environ.get(redis_server.ENV_URL)
    directory = Directory.connect(namespace=namespace)
    config = SidecarConfig(
        sidecar_id=sidecar_id, capacity=capacity, host=host, port=port, advertise_host=advertise_host,
        shm_dir=shm_dir, token=token, heartbeat_ttl=heartbeat_ttl, metrics_port=metrics_port,
    )  # fmt: skip
    try:
        server = SidecarServer(config, directory)
        server.start()
    except (SidecarError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=server.shutdown).start())
    if embedded:
        click.echo(f"started an embedded Redis: export {redis_server.ENV_URL}={redis_server.redis_url()}")
    member = server.member
    # for whoever launched it (`flyte_cornserve.launch`); the line below is for people
    announce_ready(id=member.id, address=member.address, arena=member.arena, capacity=member.capacity,
                   metrics=server.metrics_url or "")
    click.echo(f"sidecar ready id={member.id} address={member.address} arena={member.arena} capacity={member.capacity} "
               f"metrics={server.metrics_url or '-'}", nl=True)
    server.serve_forever()


def _is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) reaches only this machine: every address it names is loopback."""
    if host in _ALL_INTERFACES:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False  # the listening socket will fail to bind; refuse first, naming the token
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def _filesystem_size(path: pathlib.Path) -> int:
    stat = os.statvfs(path)
    return stat.f_blocks * stat.f_frsize
