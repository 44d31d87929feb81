"""Serving a model file with the `netron` package's viewer on 127.0.0.1, without telemetry.

``netron.start`` is not used: its request handler keeps the served file in a class attribute, so
two servers in one process (the original and the pruned graph side by side) would both show the
last file; it also configures the root logger. :class:`NetronServer` serves netron's static
viewer files and the one model file with its own handler class, bound to 127.0.0.1 only at a
free port, on a daemon thread, until :meth:`NetronServer.stop`.

What netron's browser host does at start (netron 9.3.3, ``browser.js``) and how it is switched off:

- consent: without a ``consent`` (or ``_ga``) cookie it fetches ``https://ipinfo.io/json`` and
  shows a cookie banner. The page is served with ``Set-Cookie: consent=…``, so neither happens.
- usage reporting: Google Analytics beacons (``analytics.google.com``) are sent only when the
  page is "packaged" (a ``version`` meta other than ``0.0.0``): the served page says ``0.0.0``.
- age check: a ``date`` meta older than 180 days blocks the viewer with "Please update"; the
  served page has none (netron then takes today).

The Qt view adds a request interceptor that blocks every request not to this server
(:mod:`studio.ui.dialogs.netron_view`).
"""

from __future__ import annotations

import html
import http.server
import mimetypes
import re
import socketserver
import threading
import urllib.parse
from pathlib import Path

from studio.core.errors import StudioError

HOST = "127.0.0.1"
CONSENT_COOKIE = "consent=1; Path=/; Max-Age=31536000; SameSite=Strict"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".json": "application/json"}


def netron_dir() -> Path:
    """The folder of netron's viewer files (index.html, *.js)."""
    try:
        import netron
    except ImportError as exc:
        raise StudioError("the graph view needs the netron package: pip install netron") from exc
    return Path(netron.__file__).resolve().parent


def index_html(viewer: Path, model: Path) -> bytes:
    """netron's index.html for ``model``: unpackaged (no telemetry), undated, naming the file."""
    text = (viewer / "index.html").read_text(encoding="utf-8")
    name = html.escape(model.name, quote=True)
    meta = (
        '<meta name="type" content="Python">\n<meta name="version" content="0.0.0">\n'
        f'<meta name="file" content="/data/{urllib.parse.quote(model.name)}">\n'
        f'<meta name="name" content="{name}">\n<meta name="identifier" content="{name}">'
    )
    text = re.sub(r'<meta name="date" content="[^"]*">\n?', "", text)
    text, count = re.subn(r'<meta name="version" content="[^"]*">', lambda _m: meta, text)
    if count != 1:
        raise StudioError("this netron version's index.html is not the one the studio knows")
    return text.encode("utf-8")


class _Handler(http.server.BaseHTTPRequestHandler):
    viewer: Path
    model: Path
    index: bytes

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        if path in ("/", "/index.html"):
            self._send(self.index, "text/html; charset=utf-8", cookie=True)
        elif path == f"/data/{self.model.name}":
            self._send(self.model.read_bytes(), "application/octet-stream")
        else:
            target = (self.viewer / path.lstrip("/")).resolve()
            if target.parent != self.viewer or not target.is_file():
                self._send(b"not found", "text/plain", status=404)
                return
            kind = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0]
            self._send(target.read_bytes(), kind or "application/octet-stream")

    def _send(self, body: bytes, kind: str, *, status: int = 200, cookie: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if cookie:
            self.send_header("Set-Cookie", CONSENT_COOKIE)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # no request lines on stderr


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False


class NetronServer:
    """netron's viewer for one model file at ``url`` (127.0.0.1, a free port) until stopped."""

    def __init__(self, model: str | Path, port: int = 0) -> None:
        self.model = Path(model).resolve()
        if not self.model.is_file():
            raise StudioError(f"no such file: {model}")
        viewer = netron_dir()
        handler = type(
            "NetronHandler",
            (_Handler,),
            {"viewer": viewer, "model": self.model, "index": index_html(viewer, self.model)},
        )
        try:
            self._server = _Server((HOST, port), handler)
        except OSError as exc:
            raise StudioError(f"cannot serve the graph on {HOST}:{port}: {exc}") from exc
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.name = f"netron:{self.address[1]}"
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}/"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> NetronServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
