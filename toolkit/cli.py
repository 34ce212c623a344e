"""The `edgecds` command line: thin commands over the library.

Each command parses options, builds a config, calls one library function and renders its result
(a table for people on stdout, `--json` for machines); progress goes to stderr. Heavy imports
happen inside commands, so device-side commands never load the build side (torch, transformers).
Library errors are mapped to exit codes in one place, `EdgecdsGroup.invoke`.

The commands live in `edgecds.commands` (build, device, ship, fleet); this module only registers them.
"""

from __future__ import annotations

from typing import Any

import click

from edgecds import __version__
from edgecds.commands.build import inspect, models, quantize, types_command
from edgecds.commands.device import compare_command, devices, doctor, eval_command, plan, profile, tune_command
from edgecds.commands.fleet import fleet
from edgecds.commands.ship import bundle_command, keygen_command, report_command, run_command, serve_command, verify_command
from edgecds.errors import EdgecdsError, UsageError, write_failure_message


class EdgecdsGroup(click.Group):
    """Maps library errors to click's: usage errors exit 2, everything else the user can fix exits 1."""

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


# build
cli.add_command(quantize)
cli.add_command(types_command)
cli.add_command(models)
cli.add_command(inspect)
# device
cli.add_command(devices)
cli.add_command(doctor)
cli.add_command(plan)
cli.add_command(profile)
cli.add_command(eval_command)
cli.add_command(compare_command)
cli.add_command(tune_command)
# ship
cli.add_command(report_command)
cli.add_command(bundle_command)
cli.add_command(keygen_command)
cli.add_command(verify_command)
cli.add_command(run_command)
cli.add_command(serve_command)
# many devices
cli.add_command(fleet)


def main() -> None:
    cli(prog_name="edgecds")


if __name__ == "__main__":
    main()
