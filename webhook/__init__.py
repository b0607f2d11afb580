"""Compliance-grade archive for Plivo conference recordings.

The app and its services are in `webhook.app`; the package gives their names too, imported on
first use, so that importing any part of it (`webhook.signature`, say) does not import Flask.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

__all__ = ["App", "Services", "create_app", "main", "services"]

if TYPE_CHECKING:
    from webhook.app import App, Services, create_app, services
else:

    def __getattr__(name: str) -> Any:
        if name in __all__ and name != "main":
            from webhook import app

            return getattr(app, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """The `webhook` command (`webhook.cli`), its modules imported with the collector off.

    Importing them builds only what lives as long as the process (modules, classes, the ORM's
    mappings), and Python's collector, run every few hundred of those objects, would search it
    for garbage again and again: a tenth of a worker's start-up (`bench/drain.py`). Frozen once
    imported, it is left out of every later collection too.
    """
    gc.disable()
    try:
        from webhook import cli
    finally:
        gc.freeze()
        gc.enable()
    cli.main()
