"""The one place a model's chat template is rendered, for both engines and every caller (`run`,
`serve`, `eval`, `profile`, the bundle's start-up check).

A chat template is Jinja code from the model file: untrusted. It runs in Jinja's immutable sandbox
(no attribute writes, no unsafe calls; CVE-2024-34359 was a template that escaped a plain
environment), configured as Hugging Face's and llama-cpp-python's renderers are (trim_blocks,
lstrip_blocks, `loopcontrols`, the `{% generation %}` tag, `tojson` as json.dumps, `raise_exception`),
so a template renders here exactly as it does there. And it is bounded, because a sandbox alone
lets a template loop for hours or ask for a 100 GB string, and a Python thread cannot be stopped:
- it renders in a worker process of its own (one per edgecds process, started on first use, no
  model in it), with RENDER_SECONDS of wall time a render, after which the worker is killed, and
  an address-space limit (WORKER_MEMORY), so no loop, big-number arithmetic or string bomb can
  hold or exhaust the caller;
- inside the worker, cheap checks stop the obvious bombs early with a clear reason: a line tracer
  against the clock, `*`, `**` and `+` checked before Python evaluates them, the output capped at
  MAX_PROMPT_CHARS, recursion and MemoryError turned into messages.
Every failure is an EngineError that names the template, never the conversation.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

from edgecds.errors import EngineError

RENDER_SECONDS = 2.0  # a real template renders in milliseconds
MAX_PROMPT_CHARS = 4 << 20  # characters: more than any context edgecds runs holds
MAX_PRODUCT = 1 << 22  # the largest string or list `*` or `+` may build, in items
WORKER_MEMORY = 2 << 30  # the worker's address space (RLIMIT_AS): Python and Jinja need ~300 MB of it
WORKER_START_SECONDS = 60.0
MAX_EXPONENT = 256  # `**`: bounded, so 10**10**9 is never computed
_CHECK_EVERY = 256  # traced lines between clock reads


class _TemplateBound(BaseException):
    """A bound the template ran into (time, size). Not an Exception: Jinja catches those in places
    (`is sequence`, item lookup), and a bound must end the render, not be swallowed by it."""


def _environment() -> Any:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """Hugging Face's `{% generation %}...{% endgeneration %}`: the content, rendered as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise _TemplateBound(f"an exponent of {right}")
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                    and len(left) + len(right) > MAX_PRODUCT:
                raise _TemplateBound(f"a concatenation of {len(left) + len(right)} items")
            if operator == "*":
                sized = [x for x in (left, right) if isinstance(x, (str, list, tuple))]
                counts = [x for x in (left, right) if isinstance(x, int) and not isinstance(x, bool)]
                if sized and counts and len(sized[0]) * max(counts[0], 0) > MAX_PRODUCT:
                    raise _TemplateBound(f"a repetition of {len(sized[0])} x {counts[0]} items")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


class _Deadline:
    """A line tracer for the rendering thread: raises _TemplateBound once `seconds` have passed."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.lines = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        self.lines += 1
        if self.lines % _CHECK_EVERY == 0 and time.monotonic() > self.deadline:
            raise _TemplateBound(f"more than {RENDER_SECONDS:g} s")
        return self


def render_here(template: str, messages: list[dict[str, str]], bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, seconds: float = RENDER_SECONDS) -> str:
    """The render itself, in this process (the worker's side): an EngineError when the template is
    refused by the sandbox, fails, or runs into one of the early bounds."""
    from jinja2 import TemplateError

    previous = sys.gettrace()
    pieces: list[str] = []
    size = 0
    try:
        compiled = _environment().from_string(template)
        sys.settrace(_Deadline(seconds))
        try:
            for piece in compiled.generate(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                                           add_generation_prompt=add_generation_prompt, raise_exception=_raise_exception,
                                           strftime_now=lambda f: datetime.now().strftime(f)):
                size += len(piece)
                if size > MAX_PROMPT_CHARS:
                    raise _TemplateBound(f"a prompt over {MAX_PROMPT_CHARS} characters")
                pieces.append(piece)
        finally:
            sys.settrace(previous)
    except _TemplateBound as exc:
        raise EngineError(f"the model's chat template was stopped: it ran into a bound ({exc}); this model cannot be used for chat "
                          "as shipped") from None
    except (RecursionError, MemoryError, OverflowError) as exc:  # MemoryError: the worker's address-space limit
        raise EngineError(f"the model's chat template could not be rendered ({type(exc).__name__}: it recursed or grew without "
                          "bound); this model cannot be used for chat as shipped") from None
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:  # SecurityError is a TemplateError
        raise EngineError(f"the model's chat template could not be rendered ({type(exc).__name__}: the sandbox refused it or it "
                          "is broken); this model cannot be used for chat as shipped") from None
    return "".join(pieces)


class _Worker:
    """The render worker of this process: one request at a time (a lock), each with a deadline;
    a worker that ran out of time or died is killed and a new one started for the next render."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        from edgecds.child import die_with_parent

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgecds.engine.chat_template"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent())
            assert self.proc.stdout is not None
            try:  # its start (an interpreter, Jinja) is not the template's time: it says when it is ready
                _read_line(self.proc.stdout.fileno(), time.monotonic() + WORKER_START_SECONDS)
            except (OSError, TimeoutError):
                self._stop()
                raise EngineError("the chat-template renderer did not start (python -m edgecds.engine.chat_template)") from None
        return self.proc

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def render(self, request: dict[str, Any], seconds: float) -> dict[str, Any]:
        with self.lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                proc.stdin.flush()
                line = _read_line(proc.stdout.fileno(), time.monotonic() + seconds + 0.5)  # + the pipe's and JSON's time
            except (OSError, TimeoutError) as exc:
                self._stop()
                died = isinstance(exc, OSError)
                return {"error": "the model's chat template was stopped: it ran into a bound ("
                                 + ("it exhausted the renderer's memory" if died else f"more than {seconds:g} s")
                                 + "); this model cannot be used for chat as shipped"}
            return dict(json.loads(line))


def _read_line(fd: int, deadline: float) -> bytes:
    """One line from the worker by `deadline`: TimeoutError when it is late, OSError when it died."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise OSError("the render worker ended")
        data += chunk
    return data


_WORKER = _Worker()

# what the audit renders: the turns edgecds itself sends (run, serve and eval's one turn with the
# bundle's system prompt, and a conversation that goes on)
AUDIT_CONVERSATIONS = (
    [{"role": "system", "content": "You are a clinical decision-support assistant."}, {"role": "user", "content": "Fever and rash: differential?"}],
    [{"role": "user", "content": "Fever and rash: differential?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Chest pain?"}, {"role": "assistant", "content": "Consider ACS."},
     {"role": "user", "content": "And in a 20-year-old?"}],
)


@dataclass(frozen=True)
class TemplateAudit:
    """What `bundle` found in a chat template before packing it."""

    sha256: str
    problems: tuple[str, ...]  # each a reason the run-time sandbox would refuse it, or a construct it never allows

    @property
    def passed(self) -> bool:
        return not self.problems


def _static_problems(template: str) -> list[str]:
    """Constructs no chat template needs, found in the parsed template without running it: Python
    internals (`__class__`, `_private`), and templates loaded from elsewhere (there is no loader)."""
    from jinja2 import TemplateSyntaxError, nodes

    try:
        tree = _environment().parse(template)
    except TemplateSyntaxError as exc:
        return [f"it does not parse (line {exc.lineno}: {exc.message})"]
    problems = []
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            problems.append(f"line {node.lineno} reaches for `.{node.attr}`, a Python internal")
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and str(node.arg.value).startswith("_"):
            problems.append(f"line {node.lineno} reaches for `[{node.arg.value!r}]`, a Python internal")
        elif isinstance(node, (nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
            problems.append(f"line {node.lineno} loads another template ({type(node).__name__.lower()}), which the sandbox has no loader for")
    return problems


def audit_template(template: str, bos_token: str, eos_token: str) -> TemplateAudit:
    """The static check, then the renders the run time will make, each in the bounded worker: a
    template refused here would be refused on the device, so `bundle` refuses it first."""
    import hashlib

    problems = _static_problems(template)
    if not problems:
        for messages in AUDIT_CONVERSATIONS:
            try:
                render_chat(template, messages, bos_token, eos_token)
            except EngineError as exc:
                roles = "/".join(m["role"] for m in messages)
                problems.append(f"rendering a {roles} conversation: {exc}")
                break
    return TemplateAudit(hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest(), tuple(problems))


def render_chat(template: str, messages: list[dict[str, str]], bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, seconds: float = RENDER_SECONDS) -> str:
    """`messages` in the model's chat template, ready for the reply, rendered in the bounded worker;
    an EngineError when the template is refused by the sandbox, fails, or runs into a bound."""
    request = {"template": template, "messages": list(messages), "bos_token": bos_token, "eos_token": eos_token,
               "add_generation_prompt": add_generation_prompt, "seconds": seconds}
    answer = _WORKER.render(request, seconds)
    if "error" in answer:
        raise EngineError(str(answer["error"]))
    return str(answer["prompt"])


def worker_main() -> int:
    """The worker: one JSON request a line on stdin, one JSON answer a line on stdout."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    _environment()  # Jinja imported before the first request's clock starts
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            answer = {"prompt": render_here(**request)}
        except EngineError as exc:
            answer = {"error": str(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
