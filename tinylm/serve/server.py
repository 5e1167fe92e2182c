"""The HTTP side of `tinylm serve`: the standard library's ThreadingHTTPServer.

Why the standard library: the server has a handful of routes and one user (you,
on 127.0.0.1); http.server does that with no new dependency, and its code is
short enough to read. Each request gets a thread, so a Stop or a page load is
answered while a generation runs (NumPy releases the GIL in its matmuls).

Routes (docs/serve.md has the fields and curl examples):

    GET  /                  the page (static/index.html, app.js, style.css)
    GET  /api/info          the model, the tokenizer, the limits, busy or not
    POST /api/tokenize      {"text"} -> ids and each token's text
    POST /api/generate      {"prompt", settings...} -> a stream of JSON lines (NDJSON)
    POST /api/stop          {"id"?} -> stops the running generation
    POST /api/attention     {"ids"} -> attention of the last position, every layer and head

Streaming is newline-delimited JSON over HTTP/1.0: one event per line, the
connection closes at the end. (Server-sent events would need EventSource, which
cannot POST; `fetch` reads lines just as well, and so does `curl -N`.)
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from tinylm.serve import api
from tinylm.serve.api import ApiError
from tinylm.serve.engine import Engine

STATIC = {  # path -> (file in static/, content type); nothing else is served from disk
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
POST_ROUTES = ("/api/tokenize", "/api/generate", "/api/stop", "/api/attention")
DRAIN_AT_MOST = 1 << 20  # read (and drop) an over-long body up to this, so the 413 arrives


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that holds the Engine its handlers use."""

    daemon_threads = True  # Ctrl-C does not wait for a request thread
    allow_reuse_address = True  # restart at once on the same port

    def __init__(self, address, engine: Engine, quiet: bool = False):
        super().__init__(address, Handler)
        self.engine, self.quiet = engine, quiet

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        self.engine.stop()  # a running generation ends after its current step
        super().server_close()


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                quiet: bool = False) -> Server:
    """A server bound to (host, port) (port 0: any free port; see `server.url`);
    call `serve_forever()` to run it."""
    return Server((host, port), engine, quiet)


@contextlib.contextmanager
def running(engine: Engine, host: str = "127.0.0.1", port: int = 0, quiet: bool = True):
    """Serve in a background thread for the duration of a `with` block (tests, notebooks):

        with running(Engine(model, tokenizer)) as server:
            print(server.url)
    """
    server = make_server(engine, host, port, quiet)
    thread = threading.Thread(target=server.serve_forever, name="tinylm-serve", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()  # serve_forever returns
        server.server_close()
        thread.join(timeout=10)


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "tinylm-serve"
    timeout = 60  # seconds a socket read or write may block: a vanished client is let go

    # -- dispatch ---------------------------------------------------------------------

    def do_GET(self):
        self._guarded(self._get)

    def do_POST(self):
        self._guarded(self._post)

    def _guarded(self, handle) -> None:
        """Every answer is JSON or a page: an ApiError becomes its status, any other
        exception a 500 whose traceback goes to the server's log, not to the client."""
        try:
            handle()
        except ApiError as exc:
            self._send_json(exc.status, exc.to_json())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client left
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, {"error": f"internal error ({type(exc).__name__}: {exc}); "
                                           "the server's log has the details"})

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            name, content_type = STATIC[path]
            body = resources.files("tinylm.serve").joinpath("static", name).read_bytes()
            self._send(200, body, content_type)
        elif path == "/api/info":
            self._send_json(200, self.server.engine.info())
        elif path in POST_ROUTES:
            raise ApiError(405, f"{path} takes POST with a JSON body")
        else:
            raise ApiError(404, f"no such page or endpoint: {path}")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in STATIC or path == "/api/info":
            raise ApiError(405, f"{path} takes GET")
        if path not in POST_ROUTES:
            raise ApiError(404, f"no such endpoint: {path}")
        engine = self.server.engine
        body = api.parse_body(self._read_body())
        if path == "/api/tokenize":
            self._send_json(200, engine.tokenize(api.parse_tokenize(body)))
        elif path == "/api/stop":
            self._send_json(200, {"stopped": engine.stop(api.parse_stop(body))})
        elif path == "/api/attention":
            ids = api.parse_attention(body, engine.limits, engine.tokenizer.vocab_size)
            self._send_json(200, engine.attention(ids))
        else:
            self._stream(engine.start(api.parse_generate(body, engine.limits)))

    # -- requests and responses -------------------------------------------------------

    def _read_body(self) -> bytes:
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            # also a guard: a form on another web site cannot send this type without
            # the browser asking first (CORS preflight), which this server never allows
            raise ApiError(415, "send the body as JSON, with the header "
                                "Content-Type: application/json")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length: {length!r}") from None
        limit = self.server.engine.limits.max_body_bytes
        if n > limit:
            if n <= DRAIN_AT_MOST:
                self.rfile.read(n)  # so the client, still sending, gets the answer
            self.close_connection = True
            raise ApiError(413, f"the request body has {n} bytes; the limit is {limit} "
                                "(max_body_bytes)", "max_body_bytes")
        return self.rfile.read(n)

    def _stream(self, generation) -> None:
        """Send each event as one JSON line while the model produces it. A client
        that goes away (closed tab, Stop, curl ^C) makes the next write fail: the
        generation is then stopped, which frees the model for the next request."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            for event in generation:
                self.wfile.write(json.dumps(event).encode("utf-8") + b"\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # nobody is listening: stop (below) and go
        except Exception as exc:  # the headers are sent: report it as the last event
            traceback.print_exc(file=sys.stderr)
            error = {"type": "error", "error": f"{type(exc).__name__}: {exc}"}
            try:
                self.wfile.write(json.dumps(error).encode("utf-8") + b"\n")
            except OSError:
                pass
        finally:
            generation.close()
            self.close_connection = True  # HTTP/1.0 without a length: the end is the close

    def _send_json(self, status: int, obj) -> None:
        headers = {"Retry-After": "1"} if status == 503 else {}
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            super().log_message(format, *args)
