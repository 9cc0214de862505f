"""Local fakes of the chat platforms' APIs, served on 127.0.0.1 for the adapters' tests."""

from __future__ import annotations

from aiohttp import web


class LocalServer:
    """An aiohttp app on 127.0.0.1 at a free port, with the websockets it opened closed on exit."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._sockets: list[web.WebSocketResponse] = []
        self.port = 0

    async def serve(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
