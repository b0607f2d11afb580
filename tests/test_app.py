"""The Flask app as built by `create_app`: what every request relies on."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, request

from webhook import App, services


def _every_function(app: Flask) -> Iterator[tuple[str, Callable[..., Any]]]:
    yield from (("view " + name, view) for name, view in app.view_functions.items())
    for hooks in (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs):
        for scope, funcs in hooks.items():
            yield from ((f"hook of {scope or 'the app'}", func) for func in funcs)
    yield from (("teardown of the app context", func) for func in app.teardown_appcontext_funcs)
    for scope, processors in app.template_context_processors.items():
        yield from ((f"context processor of {scope or 'the app'}", p) for p in processors)
    for scope, by_code in app.error_handler_spec.items():
        for handlers in by_code.values():
            yield from ((f"error handler of {scope or 'the app'}", h) for h in handlers.values())


def test_every_view_hook_and_error_handler_is_a_plain_function(app: Flask) -> None:
    """App.ensure_sync calls each as it is, without Flask's check for a coroutine function."""
    assert isinstance(app, App)
    found = list(_every_function(app))
    names = {func.__name__ for _where, func in found}
    # Views, hooks, the teardown and error handlers are all among them.
    assert {
        "recording_callback",
        "_log_request",
        "close_request_session",
        "_console_context",
    } <= names
    assert any(where.startswith("error handler") for where, _func in found)
    coroutines = [where for where, func in found if inspect.iscoroutinefunction(func)]
    assert not coroutines

    async def coroutine_function() -> None:
        pass

    # Which is why none may be: App runs each as it is (Flask would wrap this one).
    assert app.ensure_sync(coroutine_function) is coroutine_function


def test_a_coroutine_function_would_be_found() -> None:
    app = Flask(__name__)

    @app.get("/")
    async def view() -> str:
        return ""

    assert [where for where, func in _every_function(app) if inspect.iscoroutinefunction(func)]


def test_each_request_has_the_body_limits_of_the_config(app: Flask) -> None:
    config = app.config
    limits = (
        config["MAX_CONTENT_LENGTH"],
        config["MAX_FORM_MEMORY_SIZE"],
        config["MAX_FORM_PARTS"],
    )
    assert config["MAX_CONTENT_LENGTH"] == services(app).settings.max_callback_bytes
    with app.test_request_context("/plivo/recording", method="POST"):
        req = request._get_current_object()  # type: ignore[attr-defined]
        assert (req.max_content_length, req.max_form_memory_size, req.max_form_parts) == limits
        req.max_content_length = 10  # a request may still set its own, as Flask allows
        assert req.max_content_length == 10
        req.max_content_length = None  # and go back to the config's, as Flask does
        assert req.max_content_length == limits[0]
    with app.test_request_context("/plivo/recording", method="POST"):
        assert request.max_content_length == limits[0]


def test_the_package_gives_the_apps_names_without_importing_flask_for_its_other_parts() -> None:
    """`from webhook import create_app` works (gunicorn's `webhook:create_app()` too), but a part
    of the package that does not need Flask, such as the signature check, does not import it."""
    code = (
        "import sys, webhook.signature; light = 'flask' not in sys.modules; "
        "from webhook import create_app, Services; import webhook; "
        "print(light, create_app.__module__, Services.__module__, webhook.create_app is create_app)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["True", "webhook.app", "webhook.app", "True"]
    missing = subprocess.run(
        [sys.executable, "-c", "import webhook; webhook.create_ap"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "module 'webhook' has no attribute 'create_ap'" in missing.stderr
