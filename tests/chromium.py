"""Headless Chromium driven over the DevTools protocol (CDP) on a pipe: no websocket library, no port, nothing
downloaded. Used by the report screenshot test and by the trace test (Chrome DevTools' own trace importer).

`--remote-debugging-pipe` makes Chromium read commands on fd 3 and write replies on fd 4, each a JSON message ended
by a NUL byte. Chromium is Debian's `chromium` package (`.ci/run` installs it); when it is missing the tests fail
with the install command, never skip.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

#: the flags that render offline on a closed network: no GPU, no sandbox (root in CI), no background fetches
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
TIMEOUT_S = 60.0


def executable() -> str:
    """Chromium's path, or a test failure saying how to install it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed (the report screenshot and the trace viewer tests): "
                "apt-get install chromium  (.ci/run does this)", pytrace=False)


class Chromium:
    """One headless browser with a fresh profile; `call` sends a CDP command and returns its result."""

    def __init__(self) -> None:
        exe = executable()
        self.profile = Path(tempfile.mkdtemp(prefix="edge-rt-chromium-"))
        self.log = self.profile / "chromium.log"
        cmd_r, self._cmd_w = os.pipe()  # Chromium reads commands on fd 3
        self._out_r, out_w = os.pipe()  # and writes replies on fd 4
        # bash puts the pipe ends at 3 and 4 (dash takes one-digit fds only; a preexec_fn is unsafe with threads)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', exe, *FLAGS,
                                          f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                                          "about:blank"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(cmd_r, out_w),
                                         env={**os.environ, "TMPDIR": str(self.profile)})  # its temp files too
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise AssertionError(f"chromium did not answer within {TIMEOUT_S:.0f} s")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise AssertionError(f"chromium exited ({self.proc.poll()}): {self.log.read_text()[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            m = self._message(deadline)
            if m.get("id") == self._next_id:
                assert "error" not in m, f"{method}: {m['error']}"
                return m["result"]
            self.events.append(m)

    def wait_event(self, method: str, session: str) -> dict[str, Any]:
        """The next event `method` of `session` (events that came with earlier replies count)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method and m.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._message(deadline))

    def open(self, url: str, width: int = 1400, height: int = 900) -> str:
        """A new tab at `url`, loaded, with a `width` x `height` viewport at scale 1; returns its session."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=session)
        self.resize(session, width, height)
        self.call("Page.navigate", {"url": url}, session)
        self.wait_event("Page.loadEventFired", session)
        return session

    def resize(self, session: str, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of a JS expression (awaited if it is a promise); a JS exception fails the test."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      session)
        assert "exceptionDetails" not in r, r["exceptionDetails"].get("exception", r["exceptionDetails"])
        return r["result"].get("value")

    def screenshot(self, session: str, x: float, y: float, width: float, height: float, scale: float = 1) -> bytes:
        """A PNG of the page's box (x, y, width, height) in CSS pixels, drawn at `scale`."""
        clip = {"x": x, "y": y, "width": width, "height": height, "scale": scale}
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png", "clip": clip}, session)["data"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)
        shutil.rmtree(self.profile, ignore_errors=True)


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA PNG, with the stdlib only (zlib and the five
    PNG row filters): the venv has no imaging library, and the test needs only pixel values."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, head = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert head is not None, "PNG without IHDR"
    width, height, depth, color, _, _, interlace = head
    assert depth == 8 and color in (2, 6) and not interlace, f"unexpected PNG format {head}"
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
    return width, height, rows
