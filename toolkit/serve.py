"""`edgecds serve`: a bundle's model behind an OpenAI-compatible chat endpoint, on the clinic device.

The server is llama-cpp-python's own (FastAPI + uvicorn), configured from the bundle's
runtime.json; edgecds wraps it in one ASGI guard that enforces what a clinic needs: a bearer token
on every request, a bounded queue (503 when it is full), a bounded request body and output
length, a time limit, and no logging of requests. It binds to loopback unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecds.errors import UsageError

TOKEN_ENV = "EDGECDS_SERVE_TOKEN"
Scope = dict[str, Any]


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # None: EDGECDS_SERVE_TOKEN, else a new random one
    slots: int = 1  # requests generating at once (llama.cpp runs one sequence here)
    queue: int = 4  # requests waiting beyond those; more get 503
    max_tokens: int | None = None  # cap on each answer's tokens (default: the bundle's)
    max_body_bytes: int = 256 * 1024
    request_seconds: float = 120.0
    verify: bool = True


class Guard:
    """ASGI middleware in front of the server: token, queue, body size, output cap, time limit."""

    def __init__(self, app: Any, token: str, slots: int, queue: int, max_tokens: int, max_body: int, seconds: float) -> None:
        self.app, self.token, self.max_tokens, self.max_body, self.seconds = app, token, max_tokens, max_body, seconds
        self.capacity = slots + queue
        self.active = 0

    async def _reply(self, send: Any, status: int, message: str) -> None:
        body = json.dumps({"error": {"message": message, "code": status}}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if not secrets.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.token}".encode()):
            await self._reply(send, 401, "missing or wrong bearer token")
            return
        if self.active >= self.capacity:
            await self._reply(send, 503, "busy: every slot and queue place is taken; retry later")
            return
        self.active += 1
        try:
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if len(body) > self.max_body:
                    await self._reply(send, 413, f"request body over {self.max_body} bytes")
                    return
                if not message.get("more_body"):
                    break
            body = self._cap_tokens(scope, body)
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if sent:  # the body was read already; from here on, only a real disconnect arrives
                    return dict(await receive())
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            started = False

            async def tracked_send(message: dict[str, Any]) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await asyncio.wait_for(self.app(scope, replay, tracked_send), self.seconds)
            except asyncio.TimeoutError:
                if not started:
                    await self._reply(send, 504, f"no answer within {self.seconds:g} s")
        finally:
            self.active -= 1

    def _cap_tokens(self, scope: Scope, body: bytes) -> bytes:
        """Every completion gets max_tokens no larger than the cap (and the cap when it asked for none)."""
        if scope.get("method") != "POST" or not body:
            return body
        try:
            data = json.loads(body)
        except ValueError:
            return body  # the server answers 422 itself
        if isinstance(data, dict):
            asked = data.get("max_tokens")
            data["max_tokens"] = min(asked, self.max_tokens) if isinstance(asked, int) and asked > 0 else self.max_tokens
            return json.dumps(data).encode()
        return body


def make_app(config: ServeConfig) -> tuple[Any, str]:
    """The guarded ASGI app and the token it requires."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from edgecds.bundle.layout import BundleEngineConfig
    from edgecds.bundle.verify import verify_bundle
    from edgecds.engine.gguf_runtime import ggml_type

    if config.verify:
        verify_bundle(config.bundle)
    engine = BundleEngineConfig.read(config.bundle)
    if engine.format != "gguf":
        raise UsageError(f"{config.bundle}: serving {engine.format} bundles is not supported yet; GGUF bundles are")
    token = config.token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    model = ModelSettings(
        model=str(engine.model_path(config.bundle)), model_alias=config.bundle.name, n_ctx=engine.n_ctx,
        n_batch=engine.n_batch, n_threads=engine.threads or 1, n_threads_batch=engine.threads or 1,
        n_gpu_layers=engine.n_gpu_layers, type_k=ggml_type(engine.type_k), type_v=ggml_type(engine.type_v),
        flash_attn=engine.flash_attn, seed=engine.seed, verbose=False,
    )
    server = ServerSettings(host=config.host, port=config.port, api_key=token, interrupt_requests=True)
    app = create_app(server_settings=server, model_settings=[model])
    cap = config.max_tokens or engine.max_tokens
    return Guard(app, token, config.slots, config.queue, cap, config.max_body_bytes, config.request_seconds), token


def serve(config: ServeConfig) -> None:
    import uvicorn

    app, _ = make_app(config)
    # access_log off and warnings only: prompts and answers never reach a log
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
