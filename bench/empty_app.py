"""The ceiling of the stack: an empty Flask endpoint that gunicorn serves under exactly the
settings the service gets (`bench/ingest.py` runs both side by side)."""

from __future__ import annotations

from flask import Flask


def create_app() -> Flask:
    """A Flask app whose POST /plivo/recording answers "ok" without reading anything."""
    app = Flask(__name__)

    @app.post("/plivo/recording")
    def recording() -> str:
        return "ok"

    return app
