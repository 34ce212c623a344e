"""The one place a model's chat template is rendered, for both engines and every caller (`run`,
`serve`, `eval`, `profile`, the bundle's start-up check).

A chat template is Jinja code from the model file: untrusted. It runs in Jinja's immutable sandbox
(no attribute writes, no unsafe calls; CVE-2024-34359 was a template that escaped a plain
environment), configured as Hugging Face's and llama-cpp-python's renderers are (trim_blocks,
lstrip_blocks, `loopcontrols`, the `{% generation %}` tag, `tojson` as json.dumps, `raise_exception`),
so a template renders here exactly as it does there. And it is bounded, because a sandbox alone
lets a template loop for hours or ask for a 100 GB string:
- time: RENDER_SECONDS of wall time, enforced from inside the rendering thread by a line tracer
  that raises once the deadline passes (a thread cannot be killed; a child per request costs more);
- size: `*` and `**` on strings, lists and numbers are checked before Python evaluates them, and
  the output stops at MAX_PROMPT_CHARS;
- depth: a recursive macro's RecursionError, like a MemoryError, is an error, not a traceback.
Every failure is an EngineError that names the template, never the conversation.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from types import FrameType
from typing import Any

from edgecds.errors import EngineError

RENDER_SECONDS = 2.0  # a real template renders in milliseconds
MAX_PROMPT_CHARS = 4 << 20  # characters: more than any context edgecds runs holds
MAX_PRODUCT = 1 << 20  # the largest string or list `*` may build, in items
MAX_EXPONENT = 256  # `**`: bounded, so 10**10**9 is never computed
_CHECK_EVERY = 256  # traced lines between clock reads


class _TemplateBound(Exception):
    """A bound the template ran into (time, size)."""


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
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise _TemplateBound(f"an exponent of {right}")
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


def render_chat(template: str, messages: list[dict[str, str]], bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, seconds: float = RENDER_SECONDS) -> str:
    """`messages` in the model's chat template, ready for the reply; an EngineError when the template
    is refused by the sandbox, fails, or runs into a bound."""
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
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise EngineError(f"the model's chat template could not be rendered ({type(exc).__name__}: it recursed or grew without "
                          "bound); this model cannot be used for chat as shipped") from None
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:  # SecurityError is a TemplateError
        raise EngineError(f"the model's chat template could not be rendered ({type(exc).__name__}: the sandbox refused it or it "
                          "is broken); this model cannot be used for chat as shipped") from None
    return "".join(pieces)
