"""Real headless Chromium driven over the DevTools protocol (a WebSocket): navigate, evaluate
script in the page, take screenshots. For the live page's tests, which must watch it change."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import websockets

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,1400"]


class Page:
    def __init__(self, ws: Any) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return reply.get("result", {})  # type: ignore[no-any-return]

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, bound_s: float = 60.0) -> Any:
        """Poll `expression` until it is truthy (bounded: a test never hangs)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound_s
        while not (value := await self.eval(expression)):
            assert loop.time() < deadline, f"the page never showed {what}"
            await asyncio.sleep(0.05)
        return value

    async def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data


@contextlib.asynccontextmanager
async def browser(chromium: str) -> AsyncIterator[Page]:
    # Chromium's helpers (renderer, GPU, crash handler) may still write the profile for a moment
    # after the browser is killed: they go with its process group, and what they left is no error.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            port = None
            assert proc.stderr is not None
            for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
                if (found := re.search(r"ws://127\.0\.0\.1:(\d+)/", line)) is not None:
                    port = int(found.group(1))
                    break
            assert port is not None, "chromium did not start its DevTools endpoint"
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # never let its log fill the pipe
            async with httpx.AsyncClient() as http:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with websockets.connect(url, max_size=64 << 20) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                yield page
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
