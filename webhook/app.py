"""The Flask app and the services it shares with the worker and the CLI."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from flask import Flask, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from webhook.config import Settings, load

if TYPE_CHECKING:
    from webhook.archive.storage import Storage
    from webhook.plivo import PlivoClient


@dataclass
class Services:
    """What the app, the worker and the CLI share: settings, database and, built on first use,
    the archive storage and the Plivo client (so nothing touches the network at import or start)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]

    @cached_property
    def on_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @cached_property
    def storage(self) -> Storage:
        from webhook.archive.storage import open_storage

        return open_storage(self.settings)

    @cached_property
    def plivo(self) -> PlivoClient:
        from webhook.errors import PlivoError
        from webhook.plivo import PlivoClient

        s = self.settings
        if not (s.plivo_auth_id and s.plivo_auth_token):
            raise PlivoError(
                503, "plivo_not_configured", "PLIVO_AUTH_ID and PLIVO_AUTH_TOKEN are not set"
            )
        return PlivoClient(s.plivo_auth_id, s.plivo_auth_token, s.plivo_api_url)


class App(Flask):
    """Flask, for a service whose views, hooks, error handlers and context processors are all
    plain functions (`tests/test_app.py` holds each registered one to that)."""

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        # Flask asks of each view and hook, on every request, whether it is a coroutine function
        # to be run in an event loop; here none is, and each is called as it is.
        return func

    def fix_request_limits(self) -> None:
        """Give every request the body limits of the config as `create_app` leaves it (it calls
        this last; the web server's read-ahead in `webhook.serving` reads the same values).
        Flask's request looks each limit up in the config through the app's proxy, several times
        a request; here each is its request's own default instead, so Flask's rules stay: a
        request may set its own limit, and setting None goes back to the config's."""
        config = self.config

        class LimitedRequest(Request):
            _max_content_length = config["MAX_CONTENT_LENGTH"]
            _max_form_memory_size = config["MAX_FORM_MEMORY_SIZE"]
            _max_form_parts = config["MAX_FORM_PARTS"]

        self.request_class = LimitedRequest


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the Flask app: settings from the environment (or `test_config["SETTINGS"]`)."""
    from webhook import api, callbacks, console, errors, logs, meta, metrics
    from webhook.db import close_request_session, make_engine, make_session_factory

    # Named for the package: its folder is the root of templates and static files, and its
    # instance folder is the one the worker and the CLI use.
    app = App("webhook", instance_relative_config=True)
    test_config = test_config or {}
    settings: Settings = test_config.get("SETTINGS") or load(app.instance_path)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_callback_bytes)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # DefaultJSONProvider has it
    app.config.update({k: v for k, v in test_config.items() if k != "SETTINGS"})
    if settings.database_url.startswith("sqlite") or settings.archive_url.startswith("file:"):
        # The embedded defaults live in the instance folder.
        os.makedirs(app.instance_path, exist_ok=True)
    if settings.trusted_proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # The client address and scheme as the trusted proxies saw them; anything a client put in
        # X-Forwarded-For before them is not believed.
        hops = settings.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    engine = make_engine(
        settings.database_url,
        timeout=settings.database_timeout_seconds,
        pool_size=settings.database_pool_size,
    )
    app.extensions["webhook"] = Services(settings, engine, make_session_factory(engine))

    logs.init_app(app)
    errors.init_app(app)
    app.teardown_appcontext(close_request_session)
    app.register_blueprint(callbacks.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(meta.bp)
    app.register_blueprint(console.bp)
    metrics.init_app(app)
    app.fix_request_limits()
    return app


def services(app: Flask) -> Services:
    """The shared services of an app built by `create_app`."""
    svc: Services = app.extensions["webhook"]
    return svc
