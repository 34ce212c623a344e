"""The `edgecds` command line: thin commands over the library.

Each command parses options, builds a config, calls one library function and renders its result
(a table for people on stdout, `--json` for machines); progress goes to stderr. Heavy imports
happen inside commands, so device-side commands never load the build side (torch, transformers).
Library errors are mapped to exit codes in one place, `EdgecdsGroup.invoke`.

The commands live in `edgecds.commands` (build, device, ship, fleet); this module only registers them.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from edgecds import __version__
from edgecds.errors import EdgecdsError, UsageError, write_failure_message

# name -> (module of edgecds.commands, attribute), in the order `--help` lists them. A command's
# module is imported only when that command runs (or help lists it): `edgecds serve` on a device
# never loads the build commands, whose option defaults come from the build side's configs.
COMMANDS = {
    # build
    "quantize": ("build", "quantize"), "types": ("build", "types_command"), "models": ("build", "models"),
    "inspect": ("build", "inspect"),
    # device
    "devices": ("device", "devices"), "doctor": ("device", "doctor"), "plan": ("device", "plan"), "profile": ("device", "profile"),
    "eval": ("device", "eval_command"), "compare": ("device", "compare_command"), "tune": ("device", "tune_command"),
    # ship
    "report": ("ship", "report_command"), "bundle": ("ship", "bundle_command"), "keygen": ("ship", "keygen_command"),
    "verify": ("ship", "verify_command"), "run": ("ship", "run_command"), "serve": ("ship", "serve_command"),
    # many devices
    "fleet": ("fleet", "fleet"),
}


class EdgecdsGroup(click.Group):
    """Loads each command from its module when it is asked for; maps library errors to click's:
    usage errors exit 2, everything else the user can fix exits 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"edgecds.commands.{module}"), attribute)
        assert isinstance(command, click.Command) and command.name == cmd_name, cmd_name
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(str(exc), ctx) from None
        except EdgecdsError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full or read-only disk, a missing permission: a message, not a traceback
            message = write_failure_message(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=EdgecdsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgecds")
def cli() -> None:
    """Fit a clinical decision-support LLM to a device a clinic owns, offline.

    \b
    Example:
      edgecds models pull default
      edgecds quantize --types Q8_0,Q4_K_M -o variants/
    """


def main() -> None:
    cli(prog_name="edgecds")


if __name__ == "__main__":
    main()
