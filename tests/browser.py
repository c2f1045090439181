"""Headless Chromium for the frontend tests, driven over the Chrome DevTools Protocol (CDP) with aiohttp.

No browser-automation package: Chromium (Debian's `chromium`) is started with a debugging port, and the few CDP
commands the tests need (navigate, evaluate JavaScript, synthetic mouse events, screenshots, console errors)
go over its websocket. Tests skip with the reason where Chromium is absent.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome")
WHY_MISSING = "Chromium is not installed (Debian: apt install chromium); the browser tests need it"


def chromium_binary() -> str | None:
    return next((found for name in BINARIES if (found := shutil.which(name))), None)


class BrowserError(RuntimeError):
    pass


class Chromium:
    """`async with Chromium() as browser:` one headless page; its console errors collect in `errors`."""

    def __init__(self, width: int = 1400, height: int = 900):
        self.size = (width, height)
        self.errors: list[str] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0

    async def __aenter__(self) -> "Chromium":
        import aiohttp

        binary = chromium_binary()
        if binary is None:
            raise BrowserError(WHY_MISSING)
        self._profile = tempfile.TemporaryDirectory(prefix="protobooth-chromium-", ignore_cleanup_errors=True)
        self._process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={self._profile.name}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port = await self._debugging_port()
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(target for target in pages if target["type"] == "page")
        self._session = aiohttp.ClientSession()
        self._socket = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        # The page itself this size (the window size would include the browser's own bars).
        await self.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._reader.cancel()
        await self._socket.close()
        await self._session.close()
        os.killpg(self._process.pid, signal.SIGKILL)  # Chromium's helper processes too
        self._process.wait()
        self._profile.cleanup()

    async def _debugging_port(self, timeout: float = 30) -> int:
        active = Path(self._profile.name) / "DevToolsActivePort"
        for _ in range(int(timeout * 10)):
            if active.is_file() and active.read_text().strip():
                return int(active.read_text().splitlines()[0])
            if self._process.poll() is not None:
                raise BrowserError(f"Chromium exited at start ({self._process.returncode})")
            await asyncio.sleep(0.1)
        raise BrowserError("Chromium did not open its debugging port")

    async def _read(self) -> None:
        async for message in self._socket:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            else:
                self._note_error(data)

    def _note_error(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('text')} ({entry.get('url', '')})")

    async def send(self, method: str, **params) -> dict:
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._socket.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 60)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression (promises awaited); a thrown error becomes a BrowserError."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60):
        """Poll a JavaScript expression until it is truthy; its value."""
        for _ in range(int(timeout * 4)):
            try:
                value = await self.evaluate(expression)
            except BrowserError:
                value = None
            if value:
                return value
            await asyncio.sleep(0.25)
        raise BrowserError(f"timed out waiting for {expression}")

    async def mouse(self, kind: str, x: float, y: float, modifiers: int = 0, held: bool = False) -> None:
        """One synthetic mouse event (kind: mousePressed, mouseMoved, mouseReleased) at page coordinates; `held`: the
        left button is down (a move while dragging). modifiers: CDP's bits (8 = shift)."""
        await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, modifiers=modifiers, clickCount=1,
                        button="left" if kind != "mouseMoved" or held else "none",
                        buttons=1 if held or kind == "mousePressed" else 0)

    async def click(self, x: float, y: float, modifiers: int = 0) -> None:
        await self.mouse("mousePressed", x, y, modifiers)
        await self.mouse("mouseReleased", x, y, modifiers)

    async def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 5) -> None:
        await self.mouse("mousePressed", *start)
        for step in range(1, steps + 1):
            await self.mouse("mouseMoved", start[0] + (end[0] - start[0]) * step / steps,
                             start[1] + (end[1] - start[1]) * step / steps, held=True)
        await self.mouse("mouseReleased", *end)

    async def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(data["data"]))
        return Path(path)
