"""One source per default: a command's option defaults are its library config's.

Each command below builds one config dataclass; every option whose destination is a field of that
config (by name, or as mapped in the table) must default to what the config defaults to, compared
as the command receives it (after click's conversion: "32" for a Choice, 600.0 for a FloatRange).
The table also names the options that read their default from the config (`default_of`), so an
option turned back into a literal, or a field renamed on one side only, fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

from edgecds.bundle.choose import Constraints
from edgecds.cli import cli
from edgecds.commands.common import default_of, whole
from edgecds.compare import DEFAULT_ALPHA, compare
from edgecds.evaluate import EvalConfig, Sampling
from edgecds.fleet.run import FleetConfig, JobOptions
from edgecds.hwbench.measure import TIMEOUT_SECONDS
from edgecds.profile import ProfileConfig
from edgecds.quant.calibration import ImatrixOptions
from edgecds.quant.fit import FitOptions
from edgecds.quant.imatrix import DEFAULT_CHUNK
from edgecds.quant.onnx_build import OnnxOptions
from edgecds.quant.quantize import QuantizeConfig
from edgecds.serve import ServeConfig
from edgecds.tune import TuneConfig

COMMANDS = Path(__file__).resolve().parent.parent / "toolkit" / "commands"


def command(name: str) -> click.Command:
    found = cli.get_command(click.Context(cli), name)
    assert found is not None, name
    return found


def same(value: Any) -> Any:
    return value


def negated(flag: bool) -> bool:
    """`--no-drift` False is the config's `drift` True."""
    return not flag


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def fraction(percent: float | None) -> float | None:
    return None if percent is None else percent / 100


@dataclass(frozen=True)
class Source:
    """Where an option's default lives when it is not the command config's field of the option's name."""

    path: str  # a field, dotted into a nested config's default
    convert: Callable[[Any], Any] = same  # the command's value as the config holds it
    config: type | None = None  # another config than the command's


@dataclass(frozen=True)
class Row:
    command: click.Command
    config: type
    reads: frozenset[str]  # the options whose default is default_of(config, ...): each must be compared
    renamed: dict[str, str | Source] = field(default_factory=dict)  # option destination -> where its default lives


FLEET = command("fleet")
assert isinstance(FLEET, click.Group)
CONSTRAINTS = {"min_decode": "min_decode_tps", "formats": Source("formats", comma_list), "min_accuracy": Source("min_accuracy", fraction),
               "max_drop": Source("max_drop", fraction), "max_flip_rate": Source("max_flip_rate", fraction)}

ROWS = {
    "profile": Row(command("profile"), ProfileConfig,
                   frozenset({"kv_type", "flash_attn", "prompt_tokens", "decode_tokens", "repeats", "timeout"}),
                   {"device_id": "device", "kv_type": "cache_type", "no_accuracy": Source("accuracy", negated)}),
    "plan": Row(command("plan"), ProfileConfig, frozenset({"kv_type"}), {"kv_type": "cache_type"}),
    "eval": Row(command("eval"), EvalConfig, frozenset({"mode", "k", "samples", "temperature", "top_p", "seed"}),
                {"samples": "sampling.samples", "temperature": "sampling.temperature", "top_p": "sampling.top_p", "seed": "sampling.seed",
                 "no_drift": Source("drift", negated)}),
    "tune": Row(command("tune"), TuneConfig,
                frozenset({"objective", "min_decode", "knobs", "max_kl", "max_flip_share", "case_limit", "max_candidates", "repeats",
                           "prompt_tokens", "decode_tokens"}),
                {"device_id": "device", "knobs": Source("knobs", comma_list)}),
    "serve": Row(command("serve"), ServeConfig, frozenset({"host", "port", "slots", "queue", "request_seconds", "body_seconds"}),
                 {"no_verify": Source("verify", negated)}),
    "fleet profile": Row(FLEET.commands["profile"], FleetConfig,
                         frozenset({"retries", "task_timeout", "prompt_tokens", "decode_tokens", "repeats", "timeout"}),
                         {"threads": "options.threads", "force": "options.force", "n_ctx": "options.n_ctx", "prompt_tokens": "options.prompt_tokens",
                          "decode_tokens": "options.decode_tokens", "repeats": "options.repeats", "timeout": "options.timeout"}),
    "fleet eval": Row(FLEET.commands["eval"], FleetConfig, frozenset({"retries", "task_timeout"}),
                      {"threads": "options.threads", "force": "options.force", "limit": "options.limit",
                       "no_drift": Source("options.drift", negated)}),
    "quantize": Row(command("quantize"), QuantizeConfig,
                    frozenset({"imatrix_ctx", "block_size", "accuracy_level", "head_bits", "threads", "onnx_algorithm", "mixed",
                               "fit_builds", "fit_chunks", "fit_depth"}),
                    {"fmt": Source("formats", comma_list), "allow_requantize": "quantizer.allow_requantize", "pure": "quantizer.pure",
                     "leave_output_tensor": "quantizer.leave_output_tensor", "threads": "quantizer.threads",
                     "block_size": Source("onnx.block_size", int), "asymmetric": Source("onnx.symmetric", negated),
                     "accuracy_level": "onnx.accuracy_level", "keep_embeddings": Source("onnx.quantize_embeddings", negated),
                     "head_bits": Source("onnx.head_bits", int), "imatrix_ctx": Source("chunk_size", config=ImatrixOptions),
                     "imatrix_chunks": Source("chunks", config=ImatrixOptions), "onnx_algorithm": "onnx.algorithm", "mixed": "onnx.mixed",
                     "fit_builds": Source("max_builds", config=FitOptions), "fit_chunks": Source("drift_chunks", config=FitOptions),
                     "fit_depth": Source("depth", config=FitOptions)}),
    "bundle": Row(command("bundle"), Constraints, frozenset({"formats", "prefer", "alpha"}), CONSTRAINTS),
    "report": Row(command("report"), Constraints, frozenset({"formats", "prefer", "alpha"}), CONSTRAINTS),
}


def compared(row: Row) -> dict[str, tuple[Any, Any]]:
    """Option destination -> (its default as the command receives it, as the config holds it), for
    every option that names a field of the config with a default or is mapped in the table."""
    received = row.command.make_context("edgecds", [], resilient_parsing=True).params
    fields = {f.name for f in dataclasses.fields(row.config)
              if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}  # not VARIANTS, BUNDLE: given
    found = {}
    for param in row.command.params:
        name = param.name
        assert name is not None
        mapped = row.renamed.get(name, name if name in fields else None)
        if mapped is None:
            continue
        source = mapped if isinstance(mapped, Source) else Source(mapped)
        found[name] = (source.convert(received[name]), default_of(source.config or row.config, source.path))
    return found


@pytest.mark.parametrize("name", ROWS)
def test_every_option_that_names_a_config_field_defaults_as_the_config_does(name: str) -> None:
    pairs = compared(ROWS[name])
    wrong = {option: pair for option, pair in pairs.items() if pair[0] != pair[1]}
    assert wrong == {}, f"edgecds {name}: option default (as received) != config default"


@pytest.mark.parametrize("name", ROWS)
def test_the_table_covers_every_option_that_reads_its_default_from_the_config(name: str) -> None:
    row = ROWS[name]
    params = {p.name for p in row.command.params}
    assert set(row.renamed) <= params, f"the table maps options edgecds {name} does not have: {set(row.renamed) - params}"
    pairs = compared(row)
    assert row.reads <= pairs.keys(), f"edgecds {name}: not compared: {row.reads - pairs.keys()}"


def test_compare_defaults_to_the_alpha_its_library_function_does() -> None:
    alpha = next(p for p in command("compare").params if p.name == "alpha")
    assert alpha.default == DEFAULT_ALPHA == inspect.signature(compare).parameters["alpha"].default


def test_the_library_writes_each_shared_default_once() -> None:
    """The fleet's node runs `profile` and `eval` as they run on a device; the timeouts are the measurer's."""
    assert ProfileConfig.timeout == TuneConfig.timeout == JobOptions().timeout == TIMEOUT_SECONDS
    profile = ProfileConfig(Path("variants.json"))
    assert (JobOptions().prompt_tokens, JobOptions().decode_tokens, JobOptions().repeats) == \
        (profile.prompt_tokens, profile.decode_tokens, profile.repeats)
    assert JobOptions().mode == EvalConfig(Path("variants.json")).mode
    assert ImatrixOptions().chunk_size == DEFAULT_CHUNK


def test_default_of_reads_nested_defaults_and_default_factories() -> None:
    assert default_of(ProfileConfig, "repeats") == 3
    assert default_of(EvalConfig, "sampling") == Sampling()
    assert default_of(EvalConfig, "sampling.temperature") == Sampling().temperature
    assert default_of(QuantizeConfig, "onnx") == OnnxOptions()  # a default_factory, called
    assert default_of(QuantizeConfig, "onnx.block_size") == OnnxOptions().block_size
    assert default_of(FleetConfig, "options.prompt_tokens") == JobOptions().prompt_tokens


@pytest.mark.parametrize(("config", "path", "says"), [
    (ProfileConfig, "variants", "ProfileConfig.variants has no default"),
    (ProfileConfig, "repeat", "ProfileConfig has no field 'repeat'"),
    (EvalConfig, "sampling.temp", "EvalConfig.sampling defaults to Sampling("),
    (QuantizeConfig, "imatrix.chunk_size", "QuantizeConfig.imatrix defaults to None, which has no field 'chunk_size'"),
    (Path, "name", "Path has no field 'name'"),
])
def test_default_of_says_which_field_has_no_default(config: type, path: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        default_of(config, path)


def test_a_whole_float_default_is_shown_as_before_and_received_as_a_float() -> None:
    assert whole(600.0) == 600 and isinstance(whole(600.0), int)
    assert whole(0.05) == 0.05 and whole(0.0) == 0
    timeout = next(p for p in ROWS["profile"].command.params if p.name == "timeout")
    assert timeout.default == 600 and compared(ROWS["profile"])["timeout"][0] == 600.0
    assert isinstance(compared(ROWS["profile"])["timeout"][0], float)


def test_no_option_writes_its_default_as_a_number_literal() -> None:
    """A number an option defaults to comes from the library (a config's field or a named constant)."""
    literal = []
    for path in sorted(COMMANDS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("option", "argument"):
                for keyword in node.keywords:
                    value = keyword.value
                    if keyword.arg == "default" and isinstance(value, ast.Constant) and type(value.value) in (int, float):
                        literal.append(f"{path.name}:{node.lineno}")
    assert literal == []
