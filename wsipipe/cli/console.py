"""What every command shares: the two consoles, progress bars, config loading, the printing of
paths and summaries, the exit codes, the ``--debug`` and ``--verbose`` flags and the logging they set.

Light on import: rich's progress bars and the pydantic config load when a command first uses them,
so ``wsipipe --help`` does not pay for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from wsipipe.config import PipelineConfig

class _Console(Console):
    """A console that wraps lines only on a terminal: piped or redirected, each line stays whole
    (a summary never breaks in the middle of a number for a script reading it)."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None and not self.is_terminal:
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


err = _Console(stderr=True)
console = _Console()
ERROR_PREFIX = "wsipipe error: "  # every WsipipeError, whatever the command

EXIT_ERROR = 2  # a WsipipeError (bad input, config, output volume); click's usage errors exit 2 too
EXIT_NO_TISSUE = 3
EXIT_BUG = 1  # anything unforeseen: a bug, reported as "unexpected"
EXIT_INTERRUPTED = 130


class Flags:
    """Process-wide switches set by the top-level options."""

    debug: bool = False
    verbose: bool = False


def configure_logging() -> None:
    """Log records on stderr from WARNING up; INFO too with ``--verbose``, DEBUG with ``--debug``.

    The level is the root handler's, not only the root logger's: Prefect and distributed give
    their loggers levels of their own (INFO) that would otherwise pass everything up. Records
    still reach the loggers' own handlers at their levels (a Prefect server keeps a run's INFO
    logs). Dask worker processes read their level from the environment. Safe to call again
    after a library has configured logging."""
    import logging
    import os

    level = logging.DEBUG if Flags.debug else logging.INFO if Flags.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    if level > logging.INFO:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    else:  # asked for on this command line: wins over a quieter level left in the environment
        os.environ["DASK_LOGGING__DISTRIBUTED"] = logging.getLevelName(level).lower()


# The options several commands share, defined once: each maps onto a config field (see load_config).
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config overriding the defaults (see configs/).")
SetOpt = typer.Option([], "--set", help="Config field override, e.g. --set tile.mpp=1.0 (repeatable; value read as YAML).")
MppOpt = typer.Option(
    None, "--mpp", help="Target resolution of patches, µm/px (tile.mpp; default: the model card's where the command knows "
    "the model, else 0.5).",
)
MppOverrideOpt = typer.Option(None, "--mpp-override", help="Use this level-0 µm/px instead of the file's (mpp_override).")
MppDefaultOpt = typer.Option(
    None, "--mpp-default", help="Level-0 µm/px for slides whose file states none; never replaces a stated one (mpp_default).",
)
ThresholdOpt = typer.Option(
    None, "--threshold", help="Tumor probability threshold (stitch.threshold; unset: the model card's where the command knows the "
    "model, else stitch.default_threshold).",
)
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (inference.device; default auto).")
SchedulerOpt = typer.Option(None, "--scheduler", help="Address of an existing Dask scheduler (dask.scheduler_address).")
ForceOpt = typer.Option(
    False, "--force",
    help="Replace a slide's earlier result made with another level-0 resolution (mpp) instead of refusing; run at a "
    "tile.mpp / tile.patch_size other than the model card's (flagged for review).",
)
DryRunOpt = typer.Option(False, "--dry-run", help="Print what would be processed or skipped and why; write nothing.")


def load_config(config: Path | None, sets: list[str] | None = None, /, **overrides: Any) -> PipelineConfig:
    """The config file (or the defaults), then the ``--set`` overrides, then the command's own
    options on top; ``None`` options are left out."""
    from wsipipe.config import load_config as load

    return load(config, {**parse_sets(sets), **overrides})


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as dotted overrides (values read as YAML)."""
    from wsipipe.run.archive import parse_overrides

    return parse_overrides(sets or [])


def help_when_bare(ctx: typer.Context) -> None:
    """A group called without a command: its help on stdout and exit 0 (not a usage error)."""
    if ctx.invoked_subcommand is None:
        text = ctx.get_help()  # typer's rich help prints itself and returns ""
        if text:
            typer.echo(text)
        raise typer.Exit(0)


@contextmanager
def progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per stage, fed by (stage, done, total) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bars = Progress(
        TextColumn("[bold]{task.description:>14}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            if not total:  # nothing to do (no tissue): no empty bar before the error line
                return
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    bars.start()
    try:
        yield update
    finally:
        # Off a terminal rich prints the bars' last state when they stop, then a line end
        # (Progress.stop). With no bar drawn that line end is an empty line before an error
        # line on stderr: stop only the (now transient) live display, which prints nothing.
        if tasks:
            bars.stop()
        else:
            bars.live.transient = True
            bars.live.stop()


def one(stage: str, update: Callable[[str, int, int], None]) -> Callable[[int, int], None]:
    """A (done, total) callback for one stage of :func:`progress`."""
    return lambda done, total: update(stage, done, total)


@contextmanager
def loss_progress(label: str) -> Iterator[Callable[[int, int, float, float], None]]:
    """One rich bar with the running loss and throughput, fed by (step, total, loss, patches/s)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bars = Progress(
        TextColumn("[bold]{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} patches/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err,
    )
    with bars:
        task = bars.add_task(label, total=None, loss=float("nan"), rate=0.0)
        yield lambda step, total, loss, rate: bars.update(task, completed=step, total=total, loss=loss, rate=rate)


def error_line(prefix: str, message: object, style: str = "red") -> None:
    """One line on stderr; the message is plain text (file names may contain brackets)."""
    err.print(Text.assemble((prefix, style), str(message)), soft_wrap=True, highlight=False)


def result_json(slide: str | Path, status: str, out_dir: str | Path | None, summary: dict | None,
                error: object = None) -> str:
    """One slide's result as one JSON line (``run --json``)."""
    import json

    summary = summary or {}
    qc = summary.get("qc") or {}
    return json.dumps({
        "slide": str(slide), "status": status, "out_dir": str(out_dir) if out_dir is not None else None,
        "decision": summary.get("decision"), "slide_score": summary.get("slide_score"),
        "tumor_area_mm2": summary.get("tumor_area_mm2"), "needs_review": qc.get("needs_review"),
        "qc_flags": [f.get("code") for f in qc.get("flags") or []],
        "error": None if error is None else str(error),
    })


def print_summary(summary: dict) -> None:
    score = summary.get("slide_score", {})
    console.print(
        f"[bold]{summary.get('slide', {}).get('name', '')}[/]: {summary.get('n_patches')} patches, "
        f"decision [bold]{summary.get('decision')}[/] (top-k mean {score.get('top_k_mean')}, max {score.get('max')}), "
        f"tumor area {summary.get('tumor_area_mm2')} mm²",
        highlight=False,
    )


def print_paths(paths: dict) -> None:
    """``label: path`` per line on stdout."""
    for label, path in paths.items():
        console.print(f"{label}: [cyan]{path}[/]", highlight=False)
