"""What the commands share: JSON and table output, and the options several commands take."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import click

from edgecds.bundle.choose import PREFERENCES, Constraints
from edgecds.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

PROFILES_DIR_HELP = "A folder of your own device profiles; repeatable. Also: EDGECDS_PROFILES."


def default_of(config: type[Any], path: str) -> Any:
    """The default a config dataclass gives `path`: a field ("repeats"), or a field of the value a
    field defaults to ("sampling.temperature", "options.prompt_tokens"); a `default_factory` is
    called. An option's default is read here, so the library's config holds each default once.
    A field without a default, or a path the config does not have, is an error at import."""
    first, *rest = path.split(".")
    known = {f.name: f for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    if first not in known:
        raise ValueError(f"{config.__name__} has no field {first!r} (asked for {path!r})")
    spec = known[first]
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        raise ValueError(f"{config.__name__}.{first} has no default (asked for {path!r})")
    walked = f"{config.__name__}.{first}"
    for name in rest:
        if not (dataclasses.is_dataclass(value) and name in {f.name for f in dataclasses.fields(value)}):
            raise ValueError(f"{walked} defaults to {value!r}, which has no field {name!r} (asked for {path!r})")
        value = getattr(value, name)
        walked = f"{walked}.{name}"
    return value


def whole(value: float) -> float:
    """A whole float as an int (600.0 -> 600), for an option's default: its help shows
    `[default: 600]` as it always has, and the option's FloatRange turns it back into 600.0."""
    return int(value) if float(value).is_integer() else value


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from edgecds.tables import Table, print_table

    print_table(Table(title, columns, rows))


@overload
def profiles_dir_option(func: F, /) -> F: ...


@overload
def profiles_dir_option(*, help: str = PROFILES_DIR_HELP) -> Callable[[F], F]: ...


def profiles_dir_option(func: F | None = None, /, *, help: str = PROFILES_DIR_HELP) -> F | Callable[[F], F]:
    """`--profiles-dir` (repeatable, passed as `profiles_dirs`): `@profiles_dir_option`, or
    `@profiles_dir_option(help=...)` for another help text."""
    option = click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False), help=help)
    return option(func) if func is not None else option


def device_option(help: str, default: str | None = None) -> Callable[[F], F]:
    """`--device` (passed as `device_id`): required without a default, else the default is shown."""
    if default is None:
        return click.option("--device", "device_id", required=True, help=help)
    return click.option("--device", "device_id", default=default, show_default=True, help=help)


def drift_chunks_option(help: str) -> Callable[[F], F]:
    """`--drift-chunks N` (passed as `drift_chunks`): llama-perplexity's --chunks, for eval and tune."""
    return click.option("--drift-chunks", type=click.IntRange(min=1), help=f"{help}  [default: all]")


def draft_options(help: str) -> Callable[[F], F]:
    """`--draft`, `--draft-max`, `--draft-p-min` (as `draft`, `draft_max`, `draft_p_min`): speculative
    decoding as llama.cpp's options name it (engine/speculative.py)."""
    from edgecds.engine.speculative import DEFAULT_DRAFT_MAX, DEFAULT_P_MIN

    options = [
        click.option("--draft", metavar="DRAFT", help=help),
        click.option("--draft-max", type=click.IntRange(1, 64), default=DEFAULT_DRAFT_MAX, show_default=True,
                     help="Tokens drafted a step at most (llama.cpp's --draft-max)."),
        click.option("--draft-p-min", type=click.FloatRange(0.0, 1.0), default=DEFAULT_P_MIN, show_default=True,
                     help="A draft model stops guessing where its top token's probability is below this (llama.cpp's --draft-p-min)."),
    ]

    def apply(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


def constraint_options(func: Any) -> Any:
    """`bundle`'s choice rules, shared by `report` (which shows what bundle would choose)."""
    options = [
        click.option("--min-accuracy", type=click.FloatRange(0, 100), help="Minimum accuracy, percent, on the lower bound of its 95% interval."),
        click.option("--on-point", is_flag=True, help="Apply --min-accuracy to the accuracy itself, not its lower bound."),
        click.option("--max-drop", type=click.FloatRange(0, 100),
                     help="Largest accuracy drop against the reference, percentage points, on the 95% lower bound of the difference."),
        click.option("--max-flip-rate", type=click.FloatRange(0, 100), help="Largest share of cases flipped against the reference, percent."),
        click.option("--min-decode", type=click.FloatRange(min=0), help="Minimum decode speed, tokens/s."),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length the clinic needs."),
        click.option("--formats", default=",".join(default_of(Constraints, "formats")), show_default=True, help="Allowed formats."),
        click.option("--allow-significantly-worse", is_flag=True, help="Accept a variant significantly worse than the reference."),
        click.option("--allow-predicted", is_flag=True, help="Choose from predicted figures where nothing was measured on the device (said wherever shown)."),
        click.option("--allow-disturbed", is_flag=True, help="Apply --min-decode to speeds measured while other processes used the CPU."),
        click.option("--prefer", type=click.Choice(PREFERENCES), default=default_of(Constraints, "prefer"), show_default=True,
                     help="Among the variants that qualify: the most faithful to the reference, the fastest or the smallest first."),
        click.option("--alpha", type=click.FloatRange(0.0001, 0.5), default=default_of(Constraints, "alpha"), show_default=True,
                     help="Significance level of the paired test against the reference (the accuracy studies use 0.01)."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, min_accuracy: float | None, on_point: bool, max_drop: float | None, max_flip_rate: float | None,
                min_decode: float | None, n_ctx: int | None, formats: str, allow_significantly_worse: bool, allow_predicted: bool,
                allow_disturbed: bool, prefer: str, alpha: float, **kwargs: Any) -> Any:
        def fraction(percent: float | None) -> float | None:
            return percent / 100 if percent is not None else None

        kwargs["constraints"] = Constraints(
            min_accuracy=fraction(min_accuracy), on_point=on_point, max_drop=fraction(max_drop), max_flip_rate=fraction(max_flip_rate),
            min_decode_tps=min_decode, n_ctx=n_ctx, formats=tuple(f.strip() for f in formats.split(",") if f.strip()),
            allow_significantly_worse=allow_significantly_worse, allow_predicted=allow_predicted, allow_disturbed=allow_disturbed,
            prefer=prefer, alpha=alpha)
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 1000**2, "MIB": 1 << 20,
               "G": 1 << 30, "GB": 1000**3, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """'120MiB', '3.5GiB', '800M' (binary, as llama.cpp prints sizes), '2GB' (decimal) or bytes."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = found.group(2).upper() if found else ""
    if not found or unit not in _SIZE_UNITS or float(found.group(1)) <= 0:
        raise UsageError(f"{text!r} is not a size: give a number with a unit, e.g. 120MiB or 3.5GiB")
    return int(float(found.group(1)) * _SIZE_UNITS[unit])
