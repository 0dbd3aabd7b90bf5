"""Open a page in a real headless Chromium (the Debian ``chromium`` package) over the DevTools protocol.

``render(html_file, screenshot)`` starts ``/usr/bin/chromium`` headless with its own profile
directory and a DevTools port, navigates to the file, waits for the load event, and returns:
every console error, uncaught exception and failed load (``errors``), the images whose
decoding failed (``broken``, by alt text), the number of images, the page's text and a
full-page screenshot written to ``screenshot``. The browser is stopped by its own pid.
Used by the tests marked ``browser`` (``make test`` runs them when ``/usr/bin/chromium`` exists).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1200,900"]
IMAGE_CHECK = ("JSON.stringify(Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
               ".map(i => i.alt || i.src.slice(0, 40)))")


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    images: int = 0
    text: str = ""
    screenshot_bytes: int = 0
    screenshot_colours: int = 0


class _Session:
    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    async def wait_for(self, method: str, timeout: float = 60):
        while not any(e.get("method") == method for e in self.events):
            self.events.append(await self.ws.receive_json(timeout=timeout))

    async def evaluate(self, expr: str):
        return (await self.call("Runtime.evaluate", expression=expr, returnByValue=True))["result"]["value"]


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append("log: " + p["entry"]["text"] + " " + p["entry"].get("url", ""))
    return out


async def _drive(port: int, url: str, screenshot: Path) -> Page:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            s = _Session(ws)
            for domain in ("Page", "Runtime", "Log"):
                await s.call(f"{domain}.enable")
            await s.call("Page.navigate", url=url)
            await s.wait_for("Page.loadEventFired")
            await asyncio.sleep(0.5)  # late console messages
            page = Page(broken=json.loads(await s.evaluate(IMAGE_CHECK)),
                        images=await s.evaluate("document.images.length"),
                        text=await s.evaluate("document.body.innerText"))
            shot = await s.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            data = base64.b64decode(shot["data"])
            screenshot.write_bytes(data)
            page.errors = _errors(s.events)
    page.screenshot_bytes = len(data)
    from PIL import Image

    page.screenshot_colours = len(Image.open(screenshot).convert("RGB").getcolors(1 << 24) or [])
    return page


def render(html_file: Path, screenshot: Path) -> Page:
    """Load ``html_file`` in headless Chromium; see the module docstring."""
    # Chromium's helper processes may still write to the profile when the browser is killed:
    # the whole process group is killed, and a file left behind does not fail the test.
    with tempfile.TemporaryDirectory(prefix="mixray-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            port = None
            for line in proc.stderr:
                if "DevTools listening on ws://" in line:
                    port = int(line.split("ws://")[1].split("/")[0].rsplit(":", 1)[1])
                    break
            if port is None:
                raise RuntimeError(f"chromium did not start (exit code {proc.poll()})")
            return asyncio.run(_drive(port, Path(html_file).resolve().as_uri(), screenshot))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
