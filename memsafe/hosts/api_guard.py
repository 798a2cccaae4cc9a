"""An ASGI middleware that refuses bad MemSafe arguments in WebUI API requests BEFORE the job starts.

The WebUI swallows exceptions raised inside script hooks (it logs them and generates anyway), so a request whose
MemSafe arguments are invalid would otherwise come back as an unmitigated image. This middleware reads the JSON
body of ``POST .../sdapi/v1/txt2img`` and ``.../img2img``, validates ``alwayson_scripts.memsafe.args`` (key
matched case-insensitively, as the WebUI does) and answers 422 with the field, the value and the allowed values.
Every other request, and every request without MemSafe arguments, passes through byte for byte.

Pure ASGI (no Starlette import), so it is testable anywhere and adds nothing to other routes.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..errors import ConfigError
from . import forge as forge_host
from .webui_args import parse_script_args

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCRIPT_KEY = "memsafe"
GUARDED_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def find_script_args(body: Any) -> tuple[bool, Any]:
    """(present, args) of the MemSafe entry of a request body's ``alwayson_scripts``."""
    if not isinstance(body, dict):
        return False, None
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        return False, None
    for name, entry in scripts.items():
        if isinstance(name, str) and name.lower() == SCRIPT_KEY:
            return True, entry
    return False, None


def check_request(path: str, body: Any, forge: bool = False) -> dict[str, Any] | None:
    """The error to answer for this request body, or None when it may go on (``forge``: the WebUI is Forge,
    where per-sample's gradient can only be forward-only)."""
    present, entry = find_script_args(body)
    if not present:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("args", []), list):
        return _error("args", 'alwayson_scripts.memsafe must be {"args": [...]}, with a list')
    try:
        request = parse_script_args(entry.get("args", []))
    except ConfigError as e:
        return _error(e.field, str(e))
    if not request.enabled:
        return None
    if path.endswith("/img2img"):
        return _error("enabled", "memsafe: MemSafe acts on txt2img only; remove it from img2img requests")
    cfg_scale = body.get("cfg_scale", 7.0)
    if isinstance(cfg_scale, (int, float)) and cfg_scale <= 1.0:
        return _error(
            "cfg_scale",
            f"memsafe: cfg_scale={cfg_scale}: MemSafe needs classifier-free guidance (cfg_scale > 1); "
            "raise cfg_scale or disable MemSafe",
        )
    # uncond_steps from a preset depends on the model family, known only at run time (checked there); an explicit
    # value can be checked now.
    steps = body.get("steps", 50)
    explicit = request.overrides.get("uncond_steps")
    if explicit is not None and isinstance(steps, int) and not isinstance(steps, bool) and int(explicit) >= steps:
        return _error(
            "uncond_steps", f"memsafe: uncond_steps: got {explicit} with steps={steps}; allowed: fewer than steps"
        )
    if forge:  # as start_job resolves it there (a1111.py); gradient and method take no preset value
        try:
            forge_host.check_config(forge_host.forge_request(request).resolve("sd1"))
        except ConfigError as e:
            return _error(e.field, str(e))
    return None


def _error(field: str, detail: str) -> dict[str, Any]:
    return {"error": "MemSafeArgumentError", "field": field, "detail": detail, "errors": detail}


class MemSafeApiGuard:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp, forge: bool = False) -> None:
        self.app, self.forge = app, forge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or scope.get("method") != "POST" or not path.endswith(GUARDED_PATHS):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see it
                await self.app(scope, _replay(b"".join(chunks), receive, message), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None  # not JSON: the WebUI answers that itself
        error = check_request(path, body, self.forge)
        if error is not None:
            payload = json.dumps(error).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, _replay(raw, receive), send)


def _replay(body: bytes, receive: Receive, pending: Message | None = None) -> Receive:
    """A ``receive`` that first hands over the body already read, then anything pending, then the original."""
    sent = False

    async def replay() -> Message:
        nonlocal sent, pending
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return replay


def install(app: Any, forge: bool = False) -> bool:
    """Add the guard to a Starlette/FastAPI app the way the WebUI adds its own middleware (reset the stack, add,
    let it be rebuilt on the next request). Returns False if it was already installed."""
    if any(getattr(m, "cls", None) is MemSafeApiGuard for m in getattr(app, "user_middleware", [])):
        return False
    app.middleware_stack = None
    app.add_middleware(MemSafeApiGuard, forge=forge)
    return True
