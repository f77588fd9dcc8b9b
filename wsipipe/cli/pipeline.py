"""The commands that take slides to outputs: ``synth``, ``tile``, ``infer``, ``stitch``, ``run``, ``demo``,
``archive``, ``report``. Each imports its stage when it runs, so the CLI starts without torch, Dask or Prefect."""

from __future__ import annotations

import contextlib
import glob
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.text import Text

from wsipipe.cli.console import (
    EXIT_ERROR,
    ConfigOpt,
    DeviceOpt,
    DryRunOpt,
    ForceOpt,
    MppDefaultOpt,
    MppOpt,
    MppOverrideOpt,
    SchedulerOpt,
    SetOpt,
    ThresholdOpt,
    Flags,
    configure_logging,
    console,
    err,
    error_line,
    help_when_bare,
    load_config,
    one,
    print_paths,
    print_summary,
    progress,
    result_json,
)
from wsipipe.errors import ConfigError, ModelLoadError, SlideOpenError, WsipipeError, writing_outputs

if TYPE_CHECKING:
    from wsipipe.run.rows import SlideResult


def synth(
    out: Path = typer.Argument(..., help="Slide file to write (.svs = Aperio-style, .tiff = generic TIFF)."),
    width: int = typer.Option(12000, help="Level-0 width, px."),
    height: int = typer.Option(9000, help="Level-0 height, px."),
    mpp: float = typer.Option(0.5, help="Level-0 resolution, µm/px."),
    seed: int = typer.Option(0, help="Random seed (layout and texture)."),
    tissue_pieces: int = typer.Option(3, help="Number of separate tissue pieces."),
    tumors: int = typer.Option(2, help="Number of planted tumor regions."),
) -> None:
    """Generate a synthetic H&E-like pyramidal slide with ground-truth GeoJSON beside it."""
    from wsipipe.slides.synth import write_synthetic_slide

    fmt = "tiff" if out.suffix.lower() in (".tif", ".tiff") else "svs"
    s = write_synthetic_slide(out, width, height, mpp=mpp, seed=seed, fmt=fmt, n_tissue=tissue_pieces, n_tumor=tumors)
    print_paths({"slide": s.path, "ground truth": s.geojson_path})


def tile(
    slide: Path = typer.Argument(..., help="Slide file (any format OpenSlide reads)."),
    out: Path = typer.Option(..., "--out", "-o", help="Zarr store to write (e.g. slide.zarr)."),
    mpp: float | None = MppOpt,
    patch_size: int | None = typer.Option(None, help="Patch edge in px at the target mpp (default 224)."),
    stride: int | None = typer.Option(None, help="Grid step in px at the target mpp (default = patch size)."),
    min_tissue: float | None = typer.Option(None, help="Minimum tissue fraction to keep a patch (default 0.5)."),
    mpp_override: float | None = MppOverrideOpt,
    mpp_default: float | None = MppDefaultOpt,
    scheduler: str | None = SchedulerOpt,
    force: bool = ForceOpt,
    overrides: list[str] = SetOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Detect tissue and write the slide's patches to a Zarr store (resumable)."""
    from wsipipe.run.client import scheduler_client
    from wsipipe.tiles.tiling import tile_slide

    cfg = load_config(
        config, overrides, **{"tile.mpp": mpp, "tile.patch_size": patch_size, "tile.stride": stride,
                              "tile.min_tissue": min_tissue, "mpp_override": mpp_override, "mpp_default": mpp_default,
                              "dask.scheduler_address": scheduler},
    )
    if not force:
        _refuse_other_resolution(slide, out, cfg)
    with progress() as update, scheduler_client(cfg.dask) as client, writing_outputs(out):
        stats = tile_slide(slide, out, cfg, client=client, progress=one("tile", update))
    note = " (already complete)" if stats.get("skipped") else ""
    print_paths({f"{stats['n_patches']} patches{note}": out})


def _refuse_other_resolution(slide: Path, store_path: Path, cfg) -> None:
    """A store tiled from another level-0 mpp is not replaced without --force. A slide that does
    not open (or has no resolution) is left to the tiler, which reports it."""
    from wsipipe.run.names import check_resolution
    from wsipipe.slides.slide import open_slide_for

    try:
        opened = open_slide_for(slide, cfg)
    except WsipipeError:
        return
    with opened:
        check_resolution(store_path, opened, cfg.tile.mpp)


def infer(
    store_path: Path = typer.Argument(..., metavar="STORE.zarr", help="Store written by `wsipipe tile`."),
    model: Path = typer.Option(..., "--model", "-m", help="Weights file (.safetensors or .pt state dict)."),
    arch: str | None = typer.Option(None, help="torchvision architecture (default resnet18 / from the file)."),
    batch_size: int | None = typer.Option(None, help="Patches per batch (default 64)."),
    device: str | None = DeviceOpt,
    force: bool = ForceOpt,
    overrides: list[str] = SetOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Classify every patch of a store; writes `probabilities` into it. A store tiled at another
    resolution or patch size than the model's card says is refused unless --force."""
    from wsipipe.models.inference import infer_store
    from wsipipe.models.model import load_model
    from wsipipe.run.job import with_card
    from wsipipe.run.names import check_store_card

    cfg = load_config(config, overrides, **{"model.arch": arch, "inference.batch_size": batch_size, "inference.device": device})
    net, info = with_card(*load_model(model, arch, None))
    check_store_card(store_path, info, force)
    with progress() as update, writing_outputs(store_path):
        stats = infer_store(store_path, net, info, cfg.inference, progress=one("infer", update))
    print_paths({f"probabilities ({stats.get('n', '?')} patches)": store_path})


def stitch(
    store_path: Path = typer.Argument(..., metavar="STORE.zarr", help="Store with probabilities."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for heatmap, tumor mask, GeoJSON, summary."),
    threshold: float | None = ThresholdOpt,
    overrides: list[str] = SetOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Heatmap, tumor mask (PNG + QuPath GeoJSON) and summary.json from a classified store."""
    from wsipipe.outputs.stitch import stitch_store

    cfg = load_config(config, overrides, **{"stitch.threshold": threshold})
    with progress() as update, writing_outputs(out):
        summary = stitch_store(
            store_path, out, cfg.stitch, progress=one("stitch", update), qc_cfg=cfg.qc, export=cfg.export
        )
    print_summary(summary)
    print_paths({"outputs": out})


def run(
    slides: list[Path] = typer.Argument(..., help="One or more slide files."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Weights file (default model.weights)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (one sub-folder per slide)."),
    mpp: float | None = MppOpt,
    mpp_override: float | None = MppOverrideOpt,
    mpp_default: float | None = MppDefaultOpt,
    threshold: float | None = ThresholdOpt,
    device: str | None = DeviceOpt,
    scheduler: str | None = SchedulerOpt,
    force: bool = ForceOpt,
    json_rows: bool = typer.Option(
        False, "--json", help="Print one JSON object per slide on stdout (and nothing else there); progress stays on stderr.",
    ),
    dry_run: bool = DryRunOpt,
    mil: Path | None = typer.Option(
        None, "--mil", help="MIL model folder (`wsipipe mil train`): slide probability and attention map after stitching (mil.model).",
    ),
    overrides: list[str] = SetOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """All stages (tile -> infer -> stitch) for each slide, slide n+1 tiling while slide n infers.
    One failing slide doesn't stop the rest."""
    from wsipipe.run.pipeline import run_slides

    cfg = load_config(config, overrides, **{
        "tile.mpp": mpp, "mpp_override": mpp_override, "mpp_default": mpp_default, "stitch.threshold": threshold,
        "inference.device": device, "dask.scheduler_address": scheduler, "mil.model": mil,
    })
    _check_mil(cfg)
    # A path that is not there is a typo, not a bad slide: fail before any work.
    missing = [p for p in slides if not p.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise SlideOpenError(missing[0], f"file not found{more}")
    if dry_run:
        _print_dry_run(slides, out, cfg, model, force)
        return
    if cfg.dask.scheduler_address:
        _run_on_cluster(slides, out, cfg, model, force, json_rows)
        return
    # While the bars run, rich sends sys.stdout to them (stderr); the rows go to the real stdout.
    stdout = sys.stdout
    if len(slides) == 1:  # one slide: its typed error is the command's exit
        _run_one(slides[0], out, cfg, model, force, json_rows)
        return
    if Flags.debug:
        _run_in_order(slides, out, cfg, model, force, json_rows)
        return
    # Up to orchestration.slides_in_flight slides at once: slide n+1 tiles while slide n infers.
    failed = 0

    def show(row: SlideResult, exc: BaseException | None) -> None:  # each slide, in order, as soon as it is done
        nonlocal failed
        if json_rows:
            typer.echo(result_json(row.slide, row.status, row.out_dir, row.summary, row.error), file=stdout)
        if exc is not None:
            failed += 1
            # a typed error names its file; the unforeseen in one slide must not end a batch either
            error_line("failed: ", exc if isinstance(exc, WsipipeError) else f"{row.slide}: unexpected {type(exc).__name__}: {exc}")
            return
        if json_rows:
            return
        with contextlib.redirect_stdout(sys.stdout if stdout.isatty() else stdout):
            if row.summary is not None:
                print_summary(row.summary)
            print_paths({Path(row.slide).name: row.out_dir})

    with progress() as update:
        lock = threading.Lock()  # two slides in flight report from two threads
        run_slides(slides, out, cfg, model, progress=lambda path: _labelled(path, update, lock), on_done=show, force=force)
    if failed:
        err.print(f"[red]{failed} of {len(slides)} slides failed[/]")
        raise typer.Exit(EXIT_ERROR)


def _check_mil(cfg) -> None:
    """A wrong ``--mil`` folder fails before any slide is touched."""
    if cfg.mil.model is not None:
        from wsipipe.models.mil import read_mil_card

        read_mil_card(cfg.mil.model)


def _run_one(slide: Path, out: Path, cfg, model: Path | None, force: bool, json_rows: bool) -> None:
    """`run` with one slide: its summary (or JSON row) on stdout; its typed error is the command's."""
    from wsipipe.run.pipeline import run_slide

    stdout = sys.stdout  # while the bars run, rich sends sys.stdout to them
    try:
        with progress() as update:
            result = run_slide(slide, out, cfg, model, progress=update, force=force)
    except WsipipeError as exc:
        if json_rows:
            typer.echo(result_json(slide, "failed", None, None, exc), file=stdout)
        raise
    if json_rows:
        typer.echo(result_json(slide, result.status, result.out_dir, result.summary), file=stdout)
        return
    print_summary(result.summary)
    print_paths({slide.name: result.out_dir})


def _print_dry_run(slides: list[Path], out: Path, cfg, model: Path | None, force: bool,
                   settings: dict[Path, dict[str, Any]] | None = None) -> None:
    """``--dry-run``: each slide's verdict on stdout, decided as a run would (torch-, Prefect- and
    Dask-free; nothing is written)."""
    from wsipipe.models.identity import weights_identity
    from wsipipe.run.names import run_model
    from wsipipe.run.plan import dry_run

    weights, cfg = run_model(model, cfg, force)  # with the model card's threshold, resolution and patch size
    info = weights_identity(weights, cfg.model.arch, cfg.model.num_classes)
    for slide, verdict in dry_run(slides, out, cfg, info, settings, force):
        console.print(Text.assemble((verdict, "cyan" if "skip" in verdict else "red" if "fail" in verdict else "green"),
                                    f"  {slide}"))


def _labelled(slide: Path, update: Callable[[str, int, int], None], lock: threading.Lock) -> Callable[[str, int, int], None]:
    """The slide's stage bars, named after it: two slides are in flight at once."""

    def labelled(stage: str, done: int, total: int) -> None:
        with lock:
            update(f"{slide.stem[:24]} {stage}", done, total)

    return labelled


def _run_in_order(slides: list[Path], out: Path, cfg, model: Path | None, force: bool = False, json_rows: bool = False) -> None:
    """`run --debug`: one slide after the other, the first unforeseen error raised with its traceback."""
    from wsipipe.run.pipeline import run_slide

    failed = 0
    stdout = sys.stdout
    for path in slides:
        try:
            with progress() as update:
                result = run_slide(path, out, cfg, model, progress=update, force=force)
            if json_rows:
                typer.echo(result_json(path, result.status, result.out_dir, result.summary), file=stdout)
                continue
            print_summary(result.summary)
            print_paths({path.name: result.out_dir})
        except WsipipeError as exc:
            failed += 1
            if json_rows:
                typer.echo(result_json(path, "failed", None, None, exc), file=stdout)
            error_line("failed: ", exc)
    if failed:
        err.print(f"[red]{failed} of {len(slides)} slides failed[/]")
        raise typer.Exit(EXIT_ERROR)


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the demo's slides and outputs."),
    config: Path | None = ConfigOpt,
) -> None:
    """Embedded default: generate slides, fit ResNet18 on one, run the pipeline on the other, score vs truth."""
    from wsipipe.files import write_atomic
    from wsipipe.run.pipeline import run_demo

    cfg = load_config(config)
    with progress() as update:
        result = run_demo(out, cfg, progress=update)
    print_summary(result.summary)
    gt = result.summary.get("ground_truth", {})
    write_atomic(out / "demo-summary.txt", json.dumps(result.summary, indent=2))
    print_paths({
        "outputs": result.out_dir,
        "QA report (open in a browser)": result.out_dir / "report.html",
        "heatmap": result.out_dir / "heatmap.png",
        "tumor annotations (QuPath)": result.out_dir / "tumor.geojson",
        **{f"{kind} (other tools)": result.out_dir / name for kind, name in (result.summary.get("exports") or {}).items()},
        "summary": result.out_dir / "summary.json",
    })
    console.print(f"tumor Dice vs ground truth: [bold]{gt.get('tumor_dice')}[/]")


def archive(
    source: str = typer.Argument(..., help="Folder of slides, glob pattern ('slides/**/*.svs') or CSV manifest."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (one sub-folder per slide)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Weights file (default model.weights)."),
    mpp: float | None = MppOpt,
    mpp_override: float | None = MppOverrideOpt,
    mpp_default: float | None = MppDefaultOpt,
    threshold: float | None = ThresholdOpt,
    device: str | None = DeviceOpt,
    scheduler: str | None = typer.Option(None, "--scheduler", help="Address of an existing Dask scheduler (default: a LocalCluster)."),
    force: bool = ForceOpt,
    dry_run: bool = DryRunOpt,
    overrides: list[str] = SetOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """The process-archive Prefect flow: only new or changed slides; failures listed, others go on.

    Runs with Prefect's ephemeral server when PREFECT_API_URL is unset (no server needed, offline),
    else it reports to that server. When every slide is up to date or unreadable, it says so
    without starting Prefect, torch or Dask."""
    from wsipipe.models.identity import weights_identity
    from wsipipe.run.archive import archive_settings, parse_overrides, scan_archive, write_archive_files
    from wsipipe.run.names import run_model
    from wsipipe.run.plan import decide

    values = parse_overrides(overrides)
    options = {"tile.mpp": mpp, "mpp_override": mpp_override, "mpp_default": mpp_default, "stitch.threshold": threshold,
               "inference.device": device, "dask.scheduler_address": scheduler}
    values.update({key: value for key, value in options.items() if value is not None})  # the flow gets them as overrides
    # A bad field, a missing archive or weights file fails here, before Prefect starts.
    cfg = load_config(config, **values)
    if not glob.has_magic(source) and not Path(source).exists():
        raise ConfigError(Path(source), "archive not found (expected a folder, a glob pattern, a .csv manifest or a slide file)")
    if model is not None and not model.exists():
        raise ModelLoadError(model, "weights file not found")
    settings = archive_settings(source)  # a bad per-slide value in a manifest fails here, before any work
    if dry_run:
        _print_dry_run(scan_archive(source), out, cfg, model, force, settings)
        return
    weights, cfg = run_model(model, cfg, force)  # with the model card's threshold, resolution and patch size
    decided = decide(scan_archive(source), out, cfg, weights_identity(weights, cfg.model.arch, cfg.model.num_classes),
                     settings, force)
    if all(row is not None for row in decided):  # nothing to process: no Prefect run
        done: list[Any] = [row.as_dict() for row in decided if row is not None]
        write_archive_files(done, out)
        _print_archive_rows(done)
        return
    import flows  # noqa: F401  (offline-safe Prefect settings first)
    from flows.archive import ArchiveFailed, process_archive

    configure_logging()  # again: importing Prefect set up its logging
    state: Any = process_archive(
        source, str(out), model=str(model) if model else None, config=str(config) if config else None,
        overrides=values, force=force, return_state=True,
    )
    # This run's own rows (the state carries them, in an ArchiveFailed when a slide failed);
    # archive-results.json may already hold a concurrent run's.
    result = state.result(raise_on_failure=False) if state.is_completed() or state.is_failed() else None
    rows = result.rows if isinstance(result, ArchiveFailed) else result
    if not isinstance(rows, list):
        error_line("archive run failed: ", state.message or state.type)
        raise typer.Exit(EXIT_ERROR)
    _print_archive_rows(rows)


def _print_archive_rows(rows: list[Any]) -> None:
    """One line per slide and the counts on stdout; exit 2 when a slide failed."""
    from wsipipe.run.archive import archive_message, status_counts

    for row in rows:
        style = {"ok": "green", "skipped": "cyan", "failed": "red"}[row["status"]]
        console.print(Text.assemble((f"{row['status']:>7} ", style), f"{row['slide']}  {row['error'] or row['out_dir']}"))
    console.print(archive_message(rows), highlight=False)
    if status_counts(rows)["failed"]:
        raise typer.Exit(EXIT_ERROR)


def report(
    slide_dir: Path = typer.Argument(..., metavar="SLIDE_OUTPUT_DIR", help="A slide's output folder (with summary.json)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Write the slide's self-contained QA report (report.html) into its output folder."""
    from wsipipe.outputs.report import write_slide_report

    qc_cfg = load_config(config).qc if config else None  # default: the thresholds the run used
    print_paths({"report": write_slide_report(slide_dir, qc_cfg)})


def _run_on_cluster(slides: list[Path], out: Path, cfg, model: Path | None, force: bool = False,
                    json_rows: bool = False) -> None:
    """`run --scheduler`: one slide per worker, inference on the workers with the GPU resource."""
    from wsipipe.run.cluster import dask_client, run_slides
    from wsipipe.run.job import output_dir
    from wsipipe.run.names import ResolutionConflict, run_model

    _, cfg = run_model(model, cfg, force)  # a card the settings contradict fails here, before the cluster starts
    if not force:  # the workers place each slide's folder themselves: refuse other resolutions first
        for slide in slides:
            try:
                output_dir(slide, out, cfg, guard=True)
            except ResolutionConflict:
                raise
            except WsipipeError:
                pass  # that slide's own error comes back in its row
    with dask_client(cfg.dask) as client:
        err.print(f"dask cluster: [cyan]{client.scheduler.address}[/]", highlight=False)
        rows = run_slides(slides, out, cfg, model, client, force=force)
    failed = [r for r in rows if r.status == "failed"]
    for row in rows:
        if json_rows:
            typer.echo(result_json(row.slide, row.status, row.out_dir, row.summary, row.error))
        if row.status == "failed":
            error_line("failed: ", row.error)
            continue
        if json_rows:
            continue
        if row.summary is not None:
            print_summary(row.summary)
        workers = ", ".join(f"{stage} on {addr}" for stage, addr in (row.workers or {}).items())
        console.print(f"{row.status} in {row.seconds:.1f} s ({workers})", highlight=False)
        print_paths({Path(row.slide).name: row.out_dir})
    if failed:
        err.print(f"[red]{len(failed)} of {len(rows)} slides failed[/]")
        raise typer.Exit(EXIT_ERROR)


config_app = typer.Typer(help="The effective configuration: show.")


@config_app.callback(invoke_without_command=True)
def config_group(ctx: typer.Context) -> None:
    """The effective configuration: show."""
    help_when_bare(ctx)


@config_app.command("show")
def config_show(
    overrides: list[str] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object: dotted field -> {value, source}."),
    config: Path | None = ConfigOpt,
) -> None:
    """Print the configuration a command would run with (YAML), each value with where it came from:
    ``# default``, ``# from FILE.yaml`` or ``# from --set``. The YAML loads back as a config file."""
    from wsipipe.cli.console import parse_sets
    from wsipipe.config import config_fields, load_config_sources, show_config, value_source

    cfg, sources = load_config_sources(config, parse_sets(overrides))
    if as_json:
        fields = config_fields(cfg)
        typer.echo(json.dumps({key: {"value": value, "source": value_source(key, sources)} for key, value in fields.items()}))
        return
    typer.echo(show_config(cfg, sources), nl=False)  # plain text: rich markup would eat [lists]


COMMANDS: list[Callable[..., None]] = [synth, tile, infer, stitch, run, demo, archive, report]
