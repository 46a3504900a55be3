"""Headless Chromium driven over the Chrome DevTools Protocol, and screenshot measures, for the OHIF tests.

Chromium comes from the Debian package ``chromium`` (scripts/test.sh installs it when it runs as root);
the DevTools client is the PyPI package ``websocket-client`` (requirements-dev.txt). Each ``Browser``
runs its own Chromium with a throw-away profile, listens for DevTools on a loopback port that Chromium
picks itself, and drives one page: navigate, evaluate JavaScript, click like a mouse, take screenshots.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

# Flags seen to work for headless Debian chromium in a container (no sandbox for root, no GPU) and to
# keep it from reaching out on its own (updates, sync, QUIC).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--mute-audio",
]


_KEEP_REJECTIONS = (
    "window.__unhandledRejections = []; window.addEventListener('unhandledrejection', e =>"
    " window.__unhandledRejections.push(String((e.reason && e.reason.stack) || e.reason)));"
)


def chromium_binary() -> Optional[str]:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_missing() -> Optional[str]:
    """Why a headless Chromium cannot be driven here (None when it can)."""
    if not chromium_binary():
        return "Chromium is not installed (Debian package chromium; scripts/test.sh installs it as root)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "the DevTools client websocket-client is not installed (requirements-dev.txt)"
    return None


class Browser:
    """One headless Chromium page under DevTools control; its log and the page's errors kept for failures."""

    def __init__(self, workdir: str, width: int = 1400, height: int = 900, timeout: float = 60.0):
        import websocket

        self.workdir = workdir
        self.profile = os.path.join(workdir, "chromium-profile")
        os.makedirs(self.profile, exist_ok=True)
        self.log_path = os.path.join(workdir, "chromium.log")
        self._log = open(self.log_path, "w")
        cmd = [chromium_binary()] + CHROMIUM_FLAGS + [
            f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.errors: List[str] = []  # the page's uncaught exceptions and console errors
        self.dialogs: List[str] = []  # messages of the JavaScript dialogs (confirm, alert) accepted
        self._ids = itertools.count(1)
        try:
            port = self._devtools_port(timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if not pages:
                raise RuntimeError(f"Chromium has no page to drive:\n{self.log_tail()}")
            # No Origin header: Chromium refuses DevTools websockets from origins it was not told to allow.
            self.ws = websocket.create_connection(
                pages[0]["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
            )
            self.send("Page.enable")
            self.send("Runtime.enable")
            # Promise rejections nobody handles: the page's own handlers keep them from DevTools' exceptions.
            self.send("Page.addScriptToEvaluateOnNewDocument", source=_KEEP_REJECTIONS)
            # A fixed page size, one device pixel per CSS pixel: screenshot pixels = page coordinates.
            self.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
        except Exception:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Chromium exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with open(port_file) as f:
                    lines = f.read().split()
                if len(lines) >= 2:
                    return int(lines[0])
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Chromium wrote no DevTools port after {timeout} s:\n{self.log_tail()}")

    # --- DevTools -----------------------------------------------------------------------------------
    def send(self, method: str, **params: Any) -> Dict:
        """One DevTools command; its result. Events that arrive meanwhile are kept only as page errors, and
        a JavaScript dialog (``window.confirm``) the page opens is accepted, as a person pressing OK."""
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})
            if msg.get("method") == "Page.javascriptDialogOpening":  # the page waits until it is answered
                self.dialogs.append(msg.get("params", {}).get("message", ""))
                answer = {"id": next(self._ids), "method": "Page.handleJavaScriptDialog", "params": {"accept": True}}
                self.ws.send(json.dumps(answer))
            self._keep_error(msg)

    def _keep_error(self, msg: Dict):
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text"))[:300])
        elif method == "Runtime.consoleAPICalled" and p.get("type") == "error":
            args = [str(a.get("value", a.get("description", ""))) for a in p.get("args", [])]
            self.errors.append("console.error: " + " ".join(args)[:300])
        del self.errors[:-50]

    def rejections(self) -> List[str]:
        """The page's promise rejections that nothing handled (since its last load), as text."""
        return self.evaluate("window.__unhandledRejections || []") or []

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page JavaScript failed: {str(r['exceptionDetails'])[:500]}")
        return r.get("result", {}).get("value")

    def navigate(self, url: str):
        r = self.send("Page.navigate", url=url)
        if r.get("errorText"):
            raise RuntimeError(f"Chromium could not open {url}: {r['errorText']}")

    def wait_for(self, expression: str, what: str, timeout: float = 90.0, poll: float = 0.5) -> Any:
        """Polls a JavaScript expression until it is truthy; its value. Fails with ``what`` after ``timeout`` s."""
        deadline = time.time() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # e.g. the page is being replaced by a navigation
                value = None
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"{what}: not seen after {timeout:.0f} s; page errors: {self.errors[-5:]}")
            time.sleep(poll)

    def rect(self, selector: str) -> Optional[Tuple[float, float, float, float]]:
        """(x, y, width, height) of the first element matching ``selector``, in CSS pixels; None if absent."""
        return self.evaluate(
            "(() => { const e = document.querySelector(%s); if (!e) return null;"
            " const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()" % json.dumps(selector)
        )

    def click(self, selector: str, clicks: int = 1, timeout: float = 30.0):
        """Mouse clicks (``clicks`` = 2: a double click) on the middle of the element matching ``selector``,
        once nothing covers it (see ``_clickable``)."""
        x, y = self._clickable("document.querySelector(%s)" % json.dumps(selector), repr(selector), timeout)
        if clicks == 1:
            return self.click_at(x, y)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for n in range(1, clicks + 1):
            self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=n)
            self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", clickCount=n)

    def click_text(self, selector: str, text: str, timeout: float = 30.0):
        """A mouse click on the first visible element matching ``selector`` whose text is ``text``, once
        nothing covers it (see ``_clickable``)."""
        find = (
            "Array.from(document.querySelectorAll(%s)).find(e => e.offsetParent !== null && e.innerText.trim() === %s)"
            % (json.dumps(selector), json.dumps(text))
        )
        self.click_at(*self._clickable(find, f"a visible {selector!r} reading {text!r}", timeout))

    def _clickable(self, find: str, what: str, timeout: float) -> Tuple[float, float]:
        """The page point at the middle of the element that JavaScript ``find`` returns, scrolled into view,
        once that element (or one inside it) is what a click there hits and it has stayed there for two looks
        0.25 s apart: a person clicks what they see, not what a closing dialog or a notification covers, nor
        where a button was before the panel above it grew (under load OHIF's panel takes seconds to settle:
        a Next Sample button seen at y 247, 285 and 327 px in three looks; a click the layout swallows is
        lost without a trace)."""
        probe = (
            "(() => { const e = %s; if (!e) return null; e.scrollIntoView({block: 'nearest'});"
            " const r = e.getBoundingClientRect(); const x = r.x + r.width / 2, y = r.y + r.height / 2;"
            " const hit = document.elementFromPoint(x, y);"
            " if (hit && (hit === e || e.contains(hit))) return [x, y];"
            " if (!hit) return 'outside the page';"
            " return 'covered by <' + hit.tagName.toLowerCase() + ' class=\"' + (hit.getAttribute('class') || '') + '\">'; })()"
            % find
        )
        deadline, before = time.time() + timeout, None
        while True:
            found = self.evaluate(probe)
            if isinstance(found, list) and found == before:
                return found[0], found[1]
            before = found if isinstance(found, list) else None
            if time.time() > deadline:
                state = "still moving" if isinstance(found, list) else found or "not on the page"
                raise RuntimeError(f"nothing to click after {timeout:.0f} s: {what} is {state}")
            time.sleep(0.25)

    def click_at(self, x: float, y: float):
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", clickCount=1)

    def drag(self, points: List[Tuple[float, float]], pause: float = 0.05):
        """A mouse drag with the left button held: pressed at the first point, moved through the others,
        released at the last (a brush stroke)."""
        (x0, y0), (x1, y1) = points[0], points[-1]
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x0, y=y0)
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", buttons=1, clickCount=1)
        for x, y in points[1:]:
            self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
            time.sleep(pause)
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y1, button="left", buttons=0, clickCount=1)

    def type_text(self, text: str):
        """Types ``text`` into the focused element, as a keyboard does (input events, no key codes)."""
        self.send("Input.insertText", text=text)

    def press(self, key: str):
        """One press of ``key``: ``ArrowUp``, ``ArrowDown``, ``Enter`` or ``Tab``."""
        code = {"ArrowUp": 38, "ArrowDown": 40, "Enter": 13, "Tab": 9}[key]
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def choose(self, select: str, value: str):
        """Picks option ``value`` of the <select> matching ``select`` from the keyboard (focus, arrow keys),
        as a person does: the browser fires its change event."""
        options = self.evaluate(
            "Array.from(document.querySelector(%s).options).map(o => o.value)" % json.dumps(select)
        )
        if value not in options:
            raise RuntimeError(f"{select!r} offers {options}, not {value!r}")
        focus = "(() => { const s = document.querySelector(%s); s.focus(); return s.value; })()"
        now = self.evaluate(focus % json.dumps(select))
        steps = options.index(value) - options.index(now)
        for _ in range(abs(steps)):
            self.press("ArrowDown" if steps > 0 else "ArrowUp")
        chosen = self.evaluate("document.querySelector(%s).value" % json.dumps(select))
        if chosen != value:
            raise RuntimeError(f"{select!r} shows {chosen!r} after the arrow keys, not {value!r}")

    def requests_to(self, part: str) -> List[str]:
        """URLs the page has fetched (its resource timing entries) that contain ``part``, oldest first."""
        return self.evaluate(
            "performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes(%s))" % json.dumps(part)
        )

    def screenshot(self, path: str) -> str:
        """The page as a PNG file at ``path``."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def wait_for_screenshot(
        self, path: str, check: Callable[[str], Optional[str]], what: str, timeout: float = 90.0
    ) -> str:
        """Screenshots to ``path`` until ``check(path)`` returns None (it returns what is still wrong).
        Fails after ``timeout`` s, naming the screenshot and the last complaint."""
        deadline = time.time() + timeout
        while True:
            self.screenshot(path)
            wrong = check(path)
            if wrong is None:
                return path
            if time.time() > deadline:
                raise AssertionError(f"{what}: {wrong} (screenshot: {path}; page errors: {self.errors[-5:]})")
            time.sleep(1.0)

    # --- end ----------------------------------------------------------------------------------------
    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def close(self):
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its renderer and GPU processes too
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


# --- screenshot measures -----------------------------------------------------------------------------


def crop(png_path: str, rect: Tuple[float, float, float, float]) -> np.ndarray:
    """The RGB pixels (int16, rows x columns x 3) of ``rect`` = (x, y, width, height) in a screenshot."""
    from PIL import Image

    with Image.open(png_path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    x, y, w, h = (int(round(v)) for v in rect)
    return rgb[max(y, 0) : y + h, max(x, 0) : x + w]


def gray(rgb: np.ndarray) -> np.ndarray:
    return rgb.mean(axis=2)


def colored(rgb: np.ndarray, min_chroma: int = 40) -> np.ndarray:
    """Pixels whose channels differ by at least ``min_chroma`` (of 255): colour, not a shade of grey.
    A CT slice alone renders grey; a segmentation overlay tints it."""
    return (rgb.max(axis=2) - rgb.min(axis=2)) >= min_chroma


# --- where the viewer draws a DICOM image ------------------------------------------------------------


def displayed_image(browser: Browser) -> Dict[str, Any]:
    """The image in OHIF's first viewport, as its cornerstone viewport reports it: ``sop_uid`` (from the
    WADO-RS image id) and ``voi`` = (lower, upper), the stored-value range mapped black to white."""
    info = browser.evaluate(
        "(() => { const e = window.cornerstone && cornerstone.getEnabledElements()[0]; if (!e) return null;"
        " const v = e.viewport; const voi = (v.getProperties() || {}).voiRange;"
        " return {imageId: v.getCurrentImageId(), voi: voi ? [voi.lower, voi.upper] : null}; })()"
    )
    if not info or not info.get("imageId"):
        raise RuntimeError("OHIF shows no image in a cornerstone viewport (window.cornerstone)")
    sop = info["imageId"].split("/instances/")[-1].split("/")[0]
    return {"sop_uid": sop, "image_id": info["imageId"], "voi": info["voi"]}


def page_affine(browser: Browser, ds) -> Tuple[np.ndarray, np.ndarray]:
    """Where the viewer draws DICOM image ``ds`` (pydicom, the image in the first viewport) on the page:
    (origin, M) with page (x, y) = origin + M @ (column, row), in CSS pixels, pixel centres.

    Patient positions (mm) of three pixel centres, from the image's geometry tags, are put through the
    viewport's own world-to-canvas mapping, so zoom, margins and flips are the viewer's, not guessed."""
    ipp = np.array([float(x) for x in ds.ImagePositionPatient])
    iop = np.array([float(x) for x in ds.ImageOrientationPatient])
    row_mm, col_mm = (float(x) for x in ds.PixelSpacing)  # between rows, between columns
    rows, cols = int(ds.Rows), int(ds.Columns)

    def world(r: int, c: int) -> List[float]:
        return (ipp + c * col_mm * iop[:3] + r * row_mm * iop[3:]).tolist()

    pts = browser.evaluate(
        "(() => { const v = cornerstone.getEnabledElements()[0].viewport; const b = v.canvas.getBoundingClientRect();"
        " return %s.map(p => { const q = v.worldToCanvas(p); return [q[0] + b.x, q[1] + b.y]; }); })()"
        % json.dumps([world(0, 0), world(0, cols - 1), world(rows - 1, 0)])
    )
    o, along_row, down_col = (np.array(p, float) for p in pts)
    return o, np.stack([(along_row - o) / (cols - 1), (down_col - o) / (rows - 1)], axis=1)


def sample_on_page(image: np.ndarray, affine, rect) -> Tuple[np.ndarray, np.ndarray]:
    """``image`` (rows x columns) as drawn into page region ``rect`` = (x, y, width, height) by ``affine``
    (page_affine), nearest pixel: (values, inside), both the shape of ``crop(..., rect)``; outside the
    image, values are 0 and inside is False."""
    o, m = affine
    x, y, w, h = (int(round(v)) for v in rect)
    py, px = np.mgrid[max(y, 0) : y + h, max(x, 0) : x + w] + 0.5
    col, row = np.einsum("ij,jhw->ihw", np.linalg.inv(m), np.stack([px - o[0], py - o[1]]))
    col, row = np.rint(col).astype(int), np.rint(row).astype(int)
    inside = (col >= 0) & (col < image.shape[1]) & (row >= 0) & (row < image.shape[0])
    values = np.zeros(py.shape, image.dtype)
    values[inside] = image[row[inside], col[inside]]
    return values, inside
