"""Command line: ``wsipipe synth | tile | infer | stitch | run | demo | archive | report | config show``
(slides to outputs, :mod:`wsipipe.cli.pipeline`), ``embed | mil train`` (slide-level models,
:mod:`wsipipe.cli.mil`) and ``patches | augment | pretrain | train | models`` (building
models, :mod:`wsipipe.cli.learn`); shared helpers in :mod:`wsipipe.cli.console`.

What a user sees when something goes wrong (:class:`WsipipeGroup`):

- a usage error (missing argument, unknown or misspelt option or command): click's own message,
  with its "did you mean" hint, and exit 2;
- a :class:`~wsipipe.errors.WsipipeError` (a bad input, config or output volume): one line on
  stderr, ``wsipipe error: `` then the file and the problem, exit 2 (3 when a slide has no tissue);
- anything else is a bug: one "unexpected" line, exit 1; ``--debug`` shows the traceback.

``wsipipe`` alone prints the help and exits 0; ``wsipipe --version`` lists the versions that matter
for a bug report.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from wsipipe.cli import learn, mil, pipeline
from wsipipe.cli.console import (
    ERROR_PREFIX, EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NO_TISSUE, Flags, configure_logging, err, error_line, help_when_bare,
)
from wsipipe.errors import NoTissueError, WsipipeError

__all__ = ["app", "main", "versions"]


class WsipipeGroup(TyperGroup):
    """The top-level group: turns what a command raises into the user-facing line and exit code.

    Click's own exceptions (usage errors, ``Exit``, ``Abort``) pass through to click, which
    formats them; it lives here, not in :func:`main`, so that ``CliRunner(app)`` in the tests
    meets exactly what a user meets."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit):  # click's usage errors and exits: click shows them
            raise
        except WsipipeError as exc:
            if Flags.debug and not isinstance(exc, NoTissueError):
                raise
            error_line(ERROR_PREFIX, exc)
            raise typer.Exit(EXIT_NO_TISSUE if isinstance(exc, NoTissueError) else EXIT_ERROR) from None
        except (typer.Abort, KeyboardInterrupt):
            err.print("wsipipe: interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if Flags.debug:
                raise
            error_line(f"wsipipe: unexpected {type(exc).__name__}: ", f"{exc} (a bug: rerun with --debug for the traceback)")
            raise typer.Exit(EXIT_BUG) from None


app = typer.Typer(cls=WsipipeGroup, add_completion=False, pretty_exceptions_enable=False, help="Whole-slide image pipeline.")

VERSIONED = ("openslide-python", "torch", "zarr", "dask", "prefect")


def versions() -> dict[str, str]:
    """wsipipe's version and those of the libraries a bug report needs, read from the installed
    packages' metadata (torch and Prefect are not imported); the OpenSlide C library's own
    version needs the binding loaded."""
    from importlib.metadata import PackageNotFoundError, version

    from wsipipe import __version__

    found = {"wsipipe": __version__}
    try:
        import openslide

        found["openslide library"] = str(openslide.__library_version__)
    except Exception as exc:  # the binding or its C library missing: say so, do not fail --version
        found["openslide library"] = f"not loadable ({type(exc).__name__}: {exc})"
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _print_versions(value: bool) -> None:
    if value:
        for name, v in versions().items():
            typer.echo(f"{name} {v}")
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", help="Show INFO logs (wsipipe, Prefect, Dask); default: warnings and errors."),
    version: bool = typer.Option(
        False, "--version", callback=_print_versions, is_eager=True, expose_value=True,
        help="Show the versions of wsipipe, OpenSlide, torch, zarr, Dask and Prefect, then exit.",
    ),
) -> None:
    Flags.debug = debug
    Flags.verbose = verbose or debug
    configure_logging()
    help_when_bare(ctx)


for _command in (*pipeline.COMMANDS, *mil.COMMANDS, *learn.COMMANDS):
    app.command()(_command)
app.add_typer(learn.models_app, name="models")
app.add_typer(mil.mil_app, name="mil")
app.add_typer(pipeline.config_app, name="config")


def main() -> None:
    """Console-script entry point (``wsipipe``): click parses, :class:`WsipipeGroup` reports, this exits."""
    app()
