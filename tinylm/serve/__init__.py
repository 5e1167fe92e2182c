"""`tinylm serve`: a local web page that generates text and shows why each token was chosen.

    tinylm serve --checkpoint runs/shakespeare-char-cpu      # then open http://127.0.0.1:8000/

The pieces, each in its own file:

    api.py       the JSON API's requests: limits, checks, errors (no HTTP, no model)
    engine.py    the model side: one generation at a time, per-step candidates, attention
    server.py    the HTTP server (the standard library's), routes, streaming
    cli.py       the command line
    static/      the page: index.html, app.js, style.css (no build step, no CDN)

docs/serve.md describes the API, with curl examples.
"""

from tinylm.serve.api import ApiError, Limits
from tinylm.serve.engine import Engine
from tinylm.serve.server import make_server, running

__all__ = ["ApiError", "Engine", "Limits", "make_server", "running"]
