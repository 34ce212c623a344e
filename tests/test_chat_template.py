"""The one chat-template renderer (engine/chat_template.py): Hugging Face's conventions, inside a
sandbox with a time, size and depth bound. A template is untrusted model metadata."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from edgecds.engine.chat_template import RENDER_SECONDS, render_chat, render_here
from edgecds.errors import EngineError, InvalidInputError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TURN = [{"role": "user", "content": "Chest pain radiating to the left arm?"}]


def test_a_real_template_renders_as_hugging_face_renders_it() -> None:
    assert render_chat(CHATML, TURN, "<s>", "</s>") == (
        "<|im_start|>user\nChest pain radiating to the left arm?<|im_end|>\n<|im_start|>assistant\n")
    # the conventions templates rely on: loop controls, tojson as json.dumps, the generation tag, raise_exception
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
                "{% generation %}!{% endgeneration %}")
    assert render_chat(template, TURN * 2, "", "") == '{"role": "user", "content": "Chest pain radiating to the left arm?"}!'
    with pytest.raises(EngineError, match="could not be rendered"):
        render_chat("{{ raise_exception('only user and assistant roles') }}", TURN, "", "")


@pytest.mark.parametrize(("template", "says"), [
    # the probe's bomb: two nested loops of 99,999 when the content holds a word (held serve forever)
    ("{% if 'pain' in messages[0]['content'] %}{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
     "{% endif %}", "more than"),
    ("{{ 'a' * 10**11 }}", "repetition"),  # was a MemoryError traceback
    ("{{ [0] * 10**9 }}", "repetition"),
    ("{{ 7 ** 100000000 }}", "exponent"),  # a number of 85 million digits
    ("{{ ((10 ** 256) ** 256) ** 256 }}", "more than|memory"),  # small exponents, one C call of minutes or gigabytes: the worker stops
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% if i is sequence %}{% endif %}{% endfor %}{% endfor %}",
     "more than"),  # Jinja swallows exceptions inside `is sequence`: the bound must not be one of those
    ("{{ 'a' | center(10 ** 10) }}", "MemoryError|memory"),  # 10 GB in one call: the worker's address space says no
    ("{% set ns = namespace(s='a' * 1000) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
     "concatenation"),  # doubling by +
    ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "characters"),  # 100 MB of prompt
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),  # was a RecursionError traceback
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
])
def test_a_template_that_would_not_end_or_would_fill_memory_is_stopped_with_a_message(template: str, says: str) -> None:
    start = time.monotonic()
    with pytest.raises(EngineError, match="chat template") as caught:
        render_chat(template, TURN, "", "")
    assert re.search(says, str(caught.value)) and "Chest pain" not in str(caught.value)  # names the template, never the conversation
    assert time.monotonic() - start < RENDER_SECONDS + 3


def test_the_time_bound_leaves_the_caller_s_tracer_in_place() -> None:
    import sys

    seen: list[str] = []

    def tracer(frame: object, event: str, arg: object) -> None:
        seen.append(event)

    previous = sys.gettrace()  # a coverage tool's, if any: put back afterwards
    sys.settrace(tracer)  # type: ignore[arg-type]
    try:
        render_chat(CHATML, TURN, "", "")
        render_here(CHATML, TURN, "", "")  # the worker's own render, in this process
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


def test_both_engines_render_through_the_bounded_sandbox(tmp_path: Path) -> None:
    """A GGUF whose own template is the probe's loop bomb: chat_messages answers with an error in
    seconds (serve held a slot forever, and the next request with it)."""
    from edgecds.engine import EngineSettings
    from edgecds.engine.gguf_runtime import GgufRuntime
    from edgecds.engine.probe_model import write_float_probe

    bomb = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    path = tmp_path / "bomb.gguf"
    write_float_probe(path, {"tokenizer.chat_template": bomb})
    runtime = GgufRuntime(path, EngineSettings(n_ctx=64))
    try:
        start = time.monotonic()
        with pytest.raises(EngineError, match="ran into a bound"):
            runtime.chat_messages(TURN)
        assert time.monotonic() - start < RENDER_SECONDS + 3
    finally:
        runtime.close()
    ours = tmp_path / "chatml.gguf"
    write_float_probe(ours, {"tokenizer.chat_template": CHATML})
    runtime = GgufRuntime(ours, EngineSettings(n_ctx=64))
    try:
        assert runtime.chat_messages(TURN) == render_chat(CHATML, TURN, "<s>", "</s>")
    finally:
        runtime.close()


@pytest.mark.parametrize(("template", "says"), [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "`.__class__`, a Python internal"),
    ("{{ cycler['__init__'] }}", "`['__init__']`, a Python internal"),
    ("{% include 'other.jinja' %}", "loads another template (include)"),
    ("{% extends 'base.jinja' %}", "loads another template (extends)"),
    ("{% for m in messages %}{{ m.content }", "it does not parse"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "ran into a bound"),
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}", "rendering a system/user conversation"),
])
def test_the_bundle_time_audit_refuses_what_the_device_would(template: str, says: str) -> None:
    from edgecds.engine.chat_template import audit_template

    audit = audit_template(template, "<s>", "</s>")
    assert not audit.passed and any(says in p for p in audit.problems), audit.problems


def test_a_real_template_passes_the_audit_and_is_named_by_its_hash() -> None:
    import hashlib

    from edgecds.engine.chat_template import audit_template

    audit = audit_template(CHATML, "<s>", "</s>")
    assert audit.passed and audit.sha256 == hashlib.sha256(CHATML.encode()).hexdigest()


def test_a_tokenizer_config_that_gives_the_template_twice_is_refused(tmp_path: Path) -> None:
    """Python's json (and transformers) keep the last of two keys; another reader may keep the first."""
    from edgecds.bundle.pack import audited_template

    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}", "eos_token": "</s>", "chat_template": "x"}')
    with pytest.raises(InvalidInputError, match="tokenizer_config.json gives 'chat_template' twice. Nothing was bundled"):
        audited_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')  # cut short: a message, never a traceback
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        audited_template(tmp_path)
