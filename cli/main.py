"""The ``afs`` command line: a thin click layer over :mod:`afs.client`.

Each command parses its input, makes one client call (import: one per transaction), prints.
Errors are translated in exactly one place, :meth:`AfsGroup.invoke`: every
:class:`afs.errors.AfsError` becomes one line ``afs: <message>`` on stderr and its
``exit_code`` (the :class:`afs.errors.ExitCode` table is in docs/cli.md). click's own usage
errors exit 2. Nothing but an unexpected bug prints a traceback, and only with AFS_DEBUG=1.

Layer rule: this package imports only afs.client, afs.errors, afs.config, afs.model and click.
"""
from __future__ import annotations

import os
import sys
import traceback

import click

from afs.errors import AfsError, ExitCode


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).strip()


class AfsGroup(click.Group):
    """The top-level group; its ``invoke`` is the CLI's only error boundary."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AfsError as exc:
            _fail(ctx, exc.message, exc.exit_code)
        except BrokenPipeError:
            # the reader went away (afs get ... | head): stop quietly
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            ctx.exit(ExitCode.ERROR)
        except OSError as exc:                 # local files (export, import)
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(ctx, f"{where}{exc.strerror or exc}", ExitCode.ERROR)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:               # noqa: BLE001 - a bug, not a user error
            if os.environ.get("AFS_DEBUG"):
                traceback.print_exc()
            _fail(ctx, f"internal error: {type(exc).__name__}: {exc} "
                       f"(set AFS_DEBUG=1 for a traceback)", ExitCode.ERROR)


def _fail(ctx: click.Context, message: str, code: int):
    click.echo(f"afs: {_one_line(message)}", err=True)
    ctx.exit(int(code))


@click.group(cls=AfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="afs", prog_name="afs")
def cli():
    """AFS: a replicated configuration filesystem.

    Data commands talk to the cluster given by --endpoints (or AFS_ENDPOINTS). Writes print
    the committed revision. Exit codes are listed in docs/cli.md.
    """


# ---------------------------------------------------------------- command registration
# One line per command. Other subsystems register theirs below the marked points.
from afs_cli import data as _data            # noqa: E402
from afs_cli import transfer as _transfer    # noqa: E402
from afs_cli import cluster as _cluster      # noqa: E402

for _cmd in (_data.get, _data.put, _data.create, _data.mkdir, _data.rm, _data.chmod,
             _data.chown, _data.ls, _data.tree, _data.stat, _data.txn):
    cli.add_command(_cmd)
cli.add_command(_transfer.import_cmd)
cli.add_command(_transfer.export_cmd)
cli.add_command(_cluster.cluster)

# Daemons (the one CLI module allowed past afs.client; it imports server/agent code lazily).
from afs_cli import daemons as _daemons      # noqa: E402
cli.add_command(_daemons.server_cmd)
cli.add_command(_daemons.agent_cmd)
cli.add_command(_daemons.dev_cluster_cmd)
from afs_cli import watch as _watch      # noqa: E402
cli.add_command(_watch.watch)
# >>> REGISTRATION POINT: afs cluster <sub> (members, transfer-leader, ...):
#     _cluster.cluster.add_command(...)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``afs = afs_cli.main:main``)."""
    return cli.main(args=argv, prog_name="afs")


if __name__ == "__main__":
    main()
