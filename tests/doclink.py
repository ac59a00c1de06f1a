"""A sync link between two replica hubs (meshd.io.docsync) over a real TCP connection on
loopback, for tests and benchmarks: `scope = await nursery.start(link, server, client)`;
`scope.cancel()` cuts it (listener, connection and both sessions)."""

from __future__ import annotations

from functools import partial

import trio

from meshd.io.docsync import RESYNC_INTERVAL, DocumentHub


async def link(server: DocumentHub, client: DocumentHub, resync_interval: float = RESYNC_INTERVAL, *,
               task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        await server.run_session(stream, "client", resync_interval=resync_interval)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
            nursery.start_soon(partial(client.run_session, stream, "server", resync_interval=resync_interval))
            task_status.started(scope)
