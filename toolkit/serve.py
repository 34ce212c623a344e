"""`edgecds serve`: a bundle's model behind an OpenAI-compatible chat endpoint, on the clinic device.

edgecds's own small ASGI app over the engine's `Runtime`, so GGUF and ONNX bundles are served
alike and every promise is kept by code edgecds owns:
- a bearer token on every route (compared in constant time); loopback unless told otherwise;
- a bounded number of requests admitted (`slots` generating, `queue` waiting; more get 503), and a
  bounded number of connections (uvicorn's limit), so stalled clients cannot hold the server;
- a request body bounded in size and in the time it may take to arrive (408 when a client stalls);
- malformed requests answered 4xx with a message that echoes nothing the client sent;
- answers capped at the bundle's max_tokens and by the context; a time limit that really stops
  generation (the decode loop checks a cancel flag every token, and the runtime is handed to the
  next request only after its generation has stopped);
- no access log, and nothing of a prompt or an answer written anywhere.
Sampling is the bundle's: greedy (temperature 0), so answers are reproducible.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecds.engine import CHAT_ROLES, Runtime, generate_greedy
from edgecds.engine.speculative import DEFAULT_DRAFT_MAX, DEFAULT_P_MIN, Speculation
from edgecds.errors import EdgecdsError, UsageError

TOKEN_ENV = "EDGECDS_SERVE_TOKEN"
MIN_TOKEN_CHARS = 8
Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
MAX_MESSAGES = 256


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # None: EDGECDS_SERVE_TOKEN, else a new random one
    slots: int = 1  # requests generating at once: one loaded copy of the model each
    queue: int = 4  # requests waiting beyond those; more get 503
    max_tokens: int | None = None  # cap on each answer's tokens (default: the bundle's)
    max_body_bytes: int = 256 * 1024
    body_seconds: float = 10.0  # time a client has to send its request headers, and then its body
    request_seconds: float = 120.0  # time a request may take, waiting included; then generation stops
    verify: bool = True
    trusted_key: str | None = None  # the signer the bundle must carry (default: EDGECDS_TRUSTED_KEY)
    draft: str | None = None  # --draft: a GGUF, "ngram" or "none"; None: the bundle's own (bundle/run.py choose_draft)
    draft_max: int = DEFAULT_DRAFT_MAX
    draft_p_min: float = DEFAULT_P_MIN


class RequestError(Exception):
    """A request the server answers with a 4xx: the message names the field, never its content."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_text(value: str) -> bool:
    """Whether a JSON string is Unicode text: "\\ud800" alone parses, but no engine can encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_chat_request(body: bytes, cap: int) -> tuple[list[dict[str, str]], int, bool]:
    """(messages, max_tokens, stream) from a chat-completions body, or a RequestError."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise RequestError(400, "the request body nests too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise RequestError(422, f"'messages' must be a list of 1 to {MAX_MESSAGES} messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise RequestError(422, f"messages[{i}] must be {{'role': one of {', '.join(CHAT_ROLES)}, 'content': a string}}")
        if not _is_text(m["content"]):
            raise RequestError(422, f"messages[{i}].content holds an unpaired surrogate escape: not Unicode text")
        parsed.append({"role": str(m["role"]), "content": str(m["content"])})
    asked = data.get("max_tokens", data.get("max_completion_tokens"))
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
        raise RequestError(422, "'max_tokens' must be a positive whole number")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, "'stream' must be true or false")
    return parsed, min(asked, cap) if asked else cap, stream


class Models:
    """`slots` runtimes of the bundle's model, each with its own draft where one drafts (a draft
    model keeps a cache of its own); one request uses one at a time."""

    def __init__(self, runtimes: list[Runtime], n_ctx: int, system_prompt: str, drafts: list[Speculation] | None = None) -> None:
        self.free: queue.Queue[tuple[Runtime, Speculation | None]] = queue.Queue()
        for runtime, draft in zip(runtimes, drafts or [None] * len(runtimes), strict=True):
            self.free.put((runtime, draft))
        self.n_ctx, self.system_prompt = n_ctx, system_prompt

    def generate(self, messages: list[dict[str, str]], max_tokens: int, cancel: threading.Event,
                 on_text: Callable[[str], None] | None) -> dict[str, Any]:
        """In a worker thread: the greedy answer, stopping at an end token, `max_tokens`, the
        context's end, or `cancel`; each new piece of text goes to `on_text` as it is made."""
        runtime, draft = self.free.get()
        try:
            if cancel.is_set():
                return {"text": "", "finish_reason": "cancelled", "prompt_tokens": 0, "completion_tokens": 0}
            if self.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            prompt = runtime.tokenize(runtime.chat_messages(messages))
            room = self.n_ctx - len(prompt)
            if room < 1:
                raise RequestError(400, f"the conversation is {len(prompt)} tokens; the model's context holds {self.n_ctx}")
            limit = min(max_tokens, room)
            sent = [""]

            def stop(out: list[int]) -> bool:
                if on_text is not None:
                    text = runtime.detokenize(out)
                    if len(text) > len(sent[0]) and not text.endswith("\ufffd"):  # whole characters only
                        on_text(text[len(sent[0]):])
                        sent[0] = text
                return cancel.is_set()

            out = generate_greedy(runtime, prompt, limit, stop, draft=draft)
            text = runtime.detokenize(out)
            if on_text is not None and len(text) > len(sent[0]):
                on_text(text[len(sent[0]):])
            reason = "cancelled" if cancel.is_set() else "length" if len(out) >= limit else "stop"
            return {"text": text.strip() if on_text is None else text, "finish_reason": reason, "prompt_tokens": len(prompt),
                    "completion_tokens": len(out)}
        finally:
            runtime.reset()
            self.free.put((runtime, draft))  # only now, with generation stopped, may another request use it


class ChatServer:
    """The ASGI app: routes, the token, admission, body limits and the time limit."""

    def __init__(self, models: Models, name: str, token: str, config: ServeConfig, cap: int) -> None:
        self.models, self.name, self.token, self.config, self.cap = models, name, token, config, cap
        self.capacity = config.slots + config.queue
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan off; no websockets here
            return
        try:
            await self._route(scope, receive, send)
        except RequestError as exc:
            await reply(send, exc.status, {"error": {"message": str(exc), "code": exc.status}})
        except EdgecdsError as exc:  # the model's own failure: its message names no request content
            await reply(send, 500, {"error": {"message": str(exc), "code": 500}})

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        if scope.get("path") == "/health" and scope.get("method") in ("GET", "HEAD"):
            # unauthenticated, as llama-server's and Ollama's are, for probes and load balancers: it names nothing
            await reply(send, 200, {"status": "ok"})
            return
        if not secrets.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong bearer token")
        method, path = scope.get("method"), scope.get("path")
        if path == "/v1/models" and method == "GET":
            await reply(send, 200, {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "edgecds"}]})
            return
        if path != "/v1/chat/completions":
            raise RequestError(404, "no such route; this server answers POST /v1/chat/completions, GET /v1/models and GET /health")
        if method != "POST":
            raise RequestError(405, "use POST")
        body = await self._read_body(headers, receive)
        messages, max_tokens, stream = parse_chat_request(body, self.cap)
        if self.active >= self.capacity:
            raise RequestError(503, "busy: every slot and queue place is taken; retry later")
        self.active += 1
        cancel = threading.Event()
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, cancel))
        try:
            await (self._stream if stream else self._complete)(messages, max_tokens, send, cancel)
        finally:
            watcher.cancel()
            self.active -= 1

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.config.max_body_bytes:
            raise RequestError(413, f"request body over {self.config.max_body_bytes} bytes (or no valid Content-Length)")
        body = b""
        deadline = time.monotonic() + self.config.body_seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestError(408, f"the request body did not arrive within {self.config.body_seconds:g} s") from None
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client went away")
            body += message.get("body", b"")
            if len(body) > self.config.max_body_bytes:
                raise RequestError(413, f"request body over {self.config.max_body_bytes} bytes")
            if not message.get("more_body"):
                return body

    def _answer(self, result: dict[str, Any], created: int, ident: str) -> dict[str, Any]:
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                 "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
        return {"id": ident, "object": "chat.completion", "created": created, "model": self.name, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]}, "finish_reason": result["finish_reason"]}]}

    async def _complete(self, messages: list[dict[str, str]], max_tokens: int, send: Send, cancel: threading.Event) -> None:
        job = asyncio.get_running_loop().run_in_executor(None, self.models.generate, messages, max_tokens, cancel, None)
        try:
            result = await asyncio.wait_for(asyncio.shield(job), self.config.request_seconds)
        except asyncio.TimeoutError:
            cancel.set()
            await job  # generation stops within a token; the runtime is free again before we answer
            raise RequestError(504, f"no answer within {self.config.request_seconds:g} s; generation was stopped") from None
        await reply(send, 200, self._answer(result, int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"))

    async def _stream(self, messages: list[dict[str, str]], max_tokens: int, send: Send, cancel: threading.Event) -> None:
        """Server-sent events: one chunk a piece of text, then the finish reason, then [DONE]."""
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue[str | None]()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        job = loop.run_in_executor(None, self.models.generate, messages, max_tokens, cancel, on_text)
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        deadline = time.monotonic() + self.config.request_seconds
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"),
                                                                             (b"cache-control", b"no-cache")]})

        def chunk(delta: dict[str, str], reason: str | None) -> bytes:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(data)}\n\n".encode()

        await send({"type": "http.response.body", "body": chunk({"role": "assistant"}, None), "more_body": True})
        while True:
            try:
                piece = await asyncio.wait_for(pieces.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                cancel.set()  # generation stops within a token; the pieces already made are still sent
                deadline = time.monotonic() + 3600
                continue
            if piece is None:
                break
            if piece:
                await send({"type": "http.response.body", "body": chunk({"content": piece}, None), "more_body": True})
        try:
            result = await job
            reason = result["finish_reason"]
        except RequestError as exc:
            reason = f"error: {exc}"
        await send({"type": "http.response.body", "body": chunk({}, reason) + b"data: [DONE]\n\n", "more_body": False})


async def _cancel_on_disconnect(receive: Receive, cancel: threading.Event) -> None:
    """Once the body is read, the next message is the client leaving: generation for a client who
    is gone stops within a token, and frees its slot (it ran to the end, 12-21 s, before)."""
    while (await receive()).get("type") != "http.disconnect":
        pass
    cancel.set()


async def reply(send: Send, status: int, data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def resolve_token(config: ServeConfig) -> str:
    token = config.token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    if len(token) < MIN_TOKEN_CHARS:
        raise UsageError(f"the serve token must be at least {MIN_TOKEN_CHARS} characters")
    return token


def make_app(config: ServeConfig) -> tuple[ChatServer, str]:
    """The app and the token it requires, with the bundle verified (unless told not to) and its
    model loaded `slots` times."""
    from edgecds.bundle.layout import BundleEngineConfig
    from edgecds.bundle.run import choose_draft
    from edgecds.bundle.verify import verify_bundle
    from edgecds.engine.factory import open_runtime

    if config.verify:
        verify_bundle(config.bundle, config.trusted_key)
    engine = BundleEngineConfig.read(config.bundle)
    draft = choose_draft(config.draft, engine.draft_settings(config.bundle), config.draft_max, config.draft_p_min)
    token = resolve_token(config)
    settings = engine.engine_settings()
    runtimes = [open_runtime(engine.model_path(config.bundle), settings) for _ in range(config.slots)]
    for runtime in runtimes:
        runtime.chat_messages([{"role": "user", "content": "check"}])  # a template the sandbox refuses fails now, at start
    drafts = [Speculation.open(draft, settings, runtime) for runtime in runtimes] if draft is not None else None
    models = Models(runtimes, engine.n_ctx, engine.system_prompt, drafts)
    return ChatServer(models, config.bundle.name, token, config, config.max_tokens or engine.max_tokens), token


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline on a request's headers: uvicorn has none, so 30
    unauthenticated sockets sending a byte every 10 s held every connection the server allows (the
    token is read from the headers, so it cannot turn them away sooner). A connection whose
    request line and headers are not complete `seconds` after it opened, or after its last
    answer, is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._waiting_after = self.cycle  # the cycle a new request's headers would replace
            self._deadline: Any = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.cycle is self._waiting_after and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._waiting_after:  # a request's headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request on this connection gets the same time (pipelined ones disarm it at once)
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def serve(config: ServeConfig, on_listening: Callable[[str], None] | None = None) -> str:
    """Serve until SIGTERM or SIGINT; `on_listening` gets the address once the model is loaded and
    the socket bound (so a supervisor's log shows when requests can come). Returns the signal's name."""
    import uvicorn

    app, _ = make_app(config)
    # access_log off and warnings only: prompts and answers never reach a log. The connection limit
    # bounds what stalled clients can hold; each gets body_seconds to send its headers, and again its body.
    settings = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False, lifespan="off",
                              limit_concurrency=4 * (config.slots + config.queue) + 8, timeout_keep_alive=5,
                              http=header_deadline_protocol(config.body_seconds))
    try:
        sock = settings.bind_socket()
    except SystemExit:  # uvicorn logs the bind error and exits 1
        raise EdgecdsError(f"cannot listen on {config.host}:{config.port} (in use, or not an address of this machine); "
                           "choose another with --port or --host") from None
    sock.listen(settings.backlog)  # bind_socket only binds: without this a client told the address would be refused until uvicorn starts
    server = _stoppable_server(settings)
    if on_listening is not None:
        host, port = sock.getsockname()[:2]
        on_listening(f"http://{f'[{host}]' if ':' in host else host}:{port}")
    with sock:
        server.run(sockets=[sock])
    return server.stopped_by


def _stoppable_server(settings: Any) -> Any:
    """uvicorn's server with its own signal handling: SIGTERM (systemd's and docker's stop) and
    SIGINT end it gracefully and the process exits 0. uvicorn re-raises the signal after shutting
    down, which a supervisor reads as a crash (exit 143)."""
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        stopped_by = ""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def stop(sig: int, frame: Any) -> None:
                self.force_exit = self.should_exit and sig == signal.SIGINT  # a second Ctrl-C: at once
                self.should_exit = True
                self.stopped_by = signal.Signals(sig).name

            originals = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server(settings)
