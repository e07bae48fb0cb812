"""The HTTP/WebSocket server (FastAPI); `create_app`, `uvicorn_kwargs` and `main` live in `app`.

Attributes are resolved lazily so `import sandbox_env.server.ws` does not build anything.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "main", "uvicorn_kwargs"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sandbox_env.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
