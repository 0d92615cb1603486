"""One `Dispatcher` (with its Redis client) per event loop and stack, shared by the connector and
the local run (`local_run`), so that tasks running on the same loop reuse its connections."""

from __future__ import annotations

import asyncio

from flyte_cornserve.redis_server import connect_async
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.services.stack import ensure_stack

_dispatchers: dict[tuple[asyncio.AbstractEventLoop, str], Dispatcher] = {}


async def shared_dispatcher() -> Dispatcher:
    key = (asyncio.get_running_loop(), ensure_stack())
    if key not in _dispatchers:
        _dispatchers[key] = Dispatcher(connect_async(key[1]))
    return _dispatchers[key]
