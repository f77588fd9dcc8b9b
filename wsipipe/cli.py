"""Command line: ``wsipipe synth | tile | infer | stitch | run | demo``.

Errors the user can meet are one line on stderr and a non-zero exit; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from wsipipe.config import PipelineConfig, load_config
from wsipipe.errors import NoTissueError, SlideOpenError, WsipipeError, writing_outputs

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Whole-slide image pipeline.")
err = Console(stderr=True)
console = Console()
_state = {"debug": False, "config": None}

EXIT_ERROR = 2
EXIT_NO_TISSUE = 3

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config overriding the defaults (see configs/).")


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _config(config: Path | None, **overrides) -> PipelineConfig:
    return load_config(config, overrides)


@contextmanager
def _progress() -> Iterator:
    """A rich progress bar per stage, fed by (stage, done, total) callbacks."""
    bars = Progress(
        TextColumn("[bold]{task.description:>14}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


def _one(stage: str, update):
    return lambda done, total: update(stage, done, total)


def _error_line(prefix: str, message, style: str = "red") -> None:
    """One line on stderr; the message is plain text (file names may contain brackets)."""
    err.print(Text.assemble((prefix, style), str(message)), soft_wrap=True, highlight=False)


def main() -> None:
    """Entry point: run the app, turning known errors into one line and an exit code."""
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except NoTissueError as exc:
        _error_line("wsipipe: ", exc, "yellow")
        sys.exit(EXIT_NO_TISSUE)
    except WsipipeError as exc:
        if _state["debug"]:
            raise
        _error_line("wsipipe error: ", exc)
        sys.exit(EXIT_ERROR)
    except (typer.Abort, KeyboardInterrupt):
        err.print("wsipipe: interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and the unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _state["debug"]:
            raise
        _error_line(f"wsipipe: unexpected {type(exc).__name__}: ", f"{exc} (rerun with --debug for the traceback)")
        sys.exit(1)


@app.command()
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
    out_console_paths({"slide": s.path, "ground truth": s.geojson_path})


@app.command()
def tile(
    slide: Path = typer.Argument(..., help="Slide file (any format OpenSlide reads)."),
    out: Path = typer.Option(..., "--out", "-o", help="Zarr store to write (e.g. slide.zarr)."),
    mpp: float | None = typer.Option(None, help="Target resolution of patches, µm/px (default 0.5)."),
    patch_size: int | None = typer.Option(None, help="Patch edge in px at the target mpp (default 224)."),
    stride: int | None = typer.Option(None, help="Grid step in px at the target mpp (default = patch size)."),
    min_tissue: float | None = typer.Option(None, help="Minimum tissue fraction to keep a patch (default 0.5)."),
    mpp_override: float | None = typer.Option(None, help="Use this level-0 mpp instead of the file's."),
    scheduler: str | None = typer.Option(None, help="Address of an existing Dask scheduler."),
    config: Path | None = ConfigOpt,
) -> None:
    """Detect tissue and write the slide's patches to a Zarr store (resumable)."""
    from wsipipe.run.cluster import scheduler_client
    from wsipipe.tiles.tiling import tile_slide

    cfg = _config(
        config, **{"tile.mpp": mpp, "tile.patch_size": patch_size, "tile.stride": stride,
                   "tile.min_tissue": min_tissue, "mpp_override": mpp_override, "dask.scheduler_address": scheduler},
    )
    with _progress() as update, scheduler_client(cfg.dask) as client, writing_outputs(out):
        stats = tile_slide(slide, out, cfg, client=client, progress=_one("tile", update))
    note = " (already complete)" if stats.get("skipped") else ""
    out_console_paths({f"{stats['n_patches']} patches{note}": out})


@app.command()
def infer(
    store_path: Path = typer.Argument(..., metavar="STORE.zarr", help="Store written by `wsipipe tile`."),
    model: Path = typer.Option(..., "--model", "-m", help="Weights file (.safetensors or .pt state dict)."),
    arch: str | None = typer.Option(None, help="torchvision architecture (default resnet18 / from the file)."),
    batch_size: int | None = typer.Option(None, help="Patches per batch (default 64)."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N (default auto)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Classify every patch of a store; writes `probabilities` into it."""
    from wsipipe.models.inference import infer_store
    from wsipipe.models.model import load_model

    cfg = _config(config, **{"model.arch": arch, "inference.batch_size": batch_size, "inference.device": device})
    net, info = load_model(model, arch, None)
    with _progress() as update, writing_outputs(store_path):
        stats = infer_store(store_path, net, info, cfg.inference, progress=_one("infer", update))
    out_console_paths({f"probabilities ({stats.get('n', '?')} patches)": store_path})


@app.command()
def stitch(
    store_path: Path = typer.Argument(..., metavar="STORE.zarr", help="Store with probabilities."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for heatmap, tumor mask, GeoJSON, summary."),
    threshold: float | None = typer.Option(None, help="Tumor probability threshold (default 0.5)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Heatmap, tumor mask (PNG + QuPath GeoJSON) and summary.json from a classified store."""
    from wsipipe.outputs.stitch import stitch_store

    cfg = _config(config, **{"stitch.threshold": threshold})
    with _progress() as update, writing_outputs(out):
        summary = stitch_store(
            store_path, out, cfg.stitch, progress=_one("stitch", update), qc_cfg=cfg.qc, export=cfg.export
        )
    _print_summary(summary)
    out_console_paths({"outputs": out})


@app.command()
def run(
    slides: list[Path] = typer.Argument(..., help="One or more slide files."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Weights file (default model.weights)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (one sub-folder per slide)."),
    mpp: float | None = typer.Option(None, help="Target resolution of patches, µm/px (default 0.5)."),
    mpp_override: float | None = typer.Option(None, help="Use this level-0 mpp instead of the files'."),
    scheduler: str | None = typer.Option(None, help="Address of an existing Dask scheduler."),
    config: Path | None = ConfigOpt,
) -> None:
    """All stages (tile -> infer -> stitch) for each slide. One failing slide doesn't stop the rest."""
    from wsipipe.run.pipeline import run_slide

    cfg = _config(config, **{"tile.mpp": mpp, "mpp_override": mpp_override, "dask.scheduler_address": scheduler})
    # A path that is not there is a typo, not a bad slide: fail before any work.
    missing = [p for p in slides if not p.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise SlideOpenError(missing[0], f"file not found{more}")
    if cfg.dask.scheduler_address:
        _run_on_cluster(slides, out, cfg, model)
        return
    failed = 0
    for path in slides:
        try:
            with _progress() as update:
                result = run_slide(path, out, cfg, model, progress=update)
            out.mkdir(parents=True, exist_ok=True)
            _print_summary(result.summary)
            out_console_paths({path.name: result.out_dir})
        except WsipipeError as exc:
            if len(slides) == 1:
                raise
            failed += 1
            _error_line("failed: ", exc)
        except Exception as exc:  # the unforeseen in one slide must not end a batch either
            if len(slides) == 1 or _state["debug"]:
                raise
            failed += 1
            _error_line("failed: ", f"{path}: unexpected {type(exc).__name__}: {exc}")
    if failed:
        err.print(f"[red]{failed} of {len(slides)} slides failed[/]")
        raise typer.Exit(EXIT_ERROR)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the demo's slides and outputs."),
    config: Path | None = ConfigOpt,
) -> None:
    """Embedded default: generate slides, fit ResNet18 on one, run the pipeline on the other, score vs truth."""
    from wsipipe.files import write_atomic
    from wsipipe.run.pipeline import run_demo

    cfg = _config(config)
    with _progress() as update:
        result = run_demo(out, cfg, progress=update)
    _print_summary(result.summary)
    gt = result.summary.get("ground_truth", {})
    write_atomic(out / "demo-summary.txt", json.dumps(result.summary, indent=2))
    out_console_paths({
        "outputs": result.out_dir,
        "QA report (open in a browser)": result.out_dir / "report.html",
        "heatmap": result.out_dir / "heatmap.png",
        "tumor annotations (QuPath)": result.out_dir / "tumor.geojson",
        **{f"{kind} (other tools)": result.out_dir / name for kind, name in (result.summary.get("exports") or {}).items()},
        "summary": result.out_dir / "summary.json",
    })
    console.print(f"tumor Dice vs ground truth: [bold]{gt.get('tumor_dice')}[/]")


@app.command()
def archive(
    source: str = typer.Argument(..., help="Folder of slides, glob pattern ('slides/**/*.svs') or CSV manifest."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (one sub-folder per slide)."),
    model: Path | None = typer.Option(None, "--model", "-m", help="Weights file (default model.weights)."),
    scheduler: str | None = typer.Option(None, help="Address of an existing Dask scheduler (default: a LocalCluster)."),
    overrides: list[str] = typer.Option([], "--set", help="Config field override, e.g. --set tile.mpp=1.0 (repeatable)."),
    config: Path | None = ConfigOpt,
) -> None:
    """The process-archive Prefect flow: only new or changed slides; failures listed, others go on.

    Runs with Prefect's ephemeral server when PREFECT_API_URL is unset (no server needed, offline),
    else it reports to that server."""
    import flows  # noqa: F401  (offline-safe Prefect settings first)
    from flows.archive import process_archive
    from wsipipe.run.archive import archive_message, parse_overrides

    values = parse_overrides(overrides)
    if scheduler:
        values["dask.scheduler_address"] = scheduler
    load_config(config, values)  # a bad field fails here, before Prefect starts
    state = process_archive(
        source, str(out), model=str(model) if model else None, config=str(config) if config else None,
        overrides=values, return_state=True,
    )
    # This run's own rows (the state carries them even when Failed); archive-results.json may
    # already hold a concurrent run's.
    rows = state.result(raise_on_failure=False) if state.is_completed() or state.is_failed() else None
    if isinstance(rows, list):
        for row in rows:
            style = {"ok": "green", "skipped": "cyan", "failed": "red"}[row["status"]]
            console.print(Text.assemble((f"{row['status']:>7} ", style), f"{row['slide']}  {row['error'] or row['out_dir']}"))
        console.print(archive_message(rows), highlight=False)
        if state.is_completed():
            return
    else:
        _error_line("archive run failed: ", state.message or state.type)
    raise typer.Exit(EXIT_ERROR)


@app.command()
def report(
    slide_dir: Path = typer.Argument(..., metavar="SLIDE_OUTPUT_DIR", help="A slide's output folder (with summary.json)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Write the slide's self-contained QA report (report.html) into its output folder."""
    from wsipipe.outputs.report import write_slide_report

    qc_cfg = _config(config).qc if config else None  # default: the thresholds the run used
    out_console_paths({"report": write_slide_report(slide_dir, qc_cfg)})


def _run_on_cluster(slides: list[Path], out: Path, cfg, model: Path | None) -> None:
    """`run --scheduler`: one slide per worker, inference on the workers with the GPU resource."""
    from wsipipe.run.cluster import dask_client, run_slides

    with dask_client(cfg.dask) as client:
        console.print(f"dask cluster: [cyan]{client.scheduler.address}[/]", highlight=False)
        rows = [r.as_dict() for r in run_slides(slides, out, cfg, model, client)]
    failed = [r for r in rows if r["status"] == "failed"]
    for row in rows:
        if row["status"] == "failed":
            _error_line("failed: ", row["error"])
            continue
        _print_summary(row["summary"])
        workers = ", ".join(f"{stage} on {addr}" for stage, addr in row["workers"].items())
        console.print(f"{row['status']} in {row['seconds']:.1f} s ({workers})", highlight=False)
        out_console_paths({Path(row["slide"]).name: row["out_dir"]})
    if failed:
        err.print(f"[red]{len(failed)} of {len(rows)} slides failed[/]")
        raise typer.Exit(EXIT_ERROR)


# --- training side: patches / augment / pretrain / train / models -------------------------------

@contextmanager
def _loss_progress(label: str) -> Iterator:
    """One rich bar with the running loss and throughput, fed by (step, total, loss, patches/s)."""
    bars = Progress(
        TextColumn("[bold]{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} patches/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err,
    )
    with bars:
        task = bars.add_task(label, total=None, loss=float("nan"), rate=0.0)
        yield lambda step, total, loss, rate: bars.update(task, completed=step, total=total, loss=loss, rate=rate)


@app.command()
def patches(
    source: Path = typer.Argument(..., help="A tiled store (with --annotations) or a folder with one sub-folder per class."),
    annotations: Path | None = typer.Option(None, "--annotations", "-a", help="QuPath GeoJSON for a tiled store."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Zarr store to write (folder sets)."),
    classes: str | None = typer.Option(None, help="Comma-separated classes in index order, background first (default: Normal + the GeoJSON's)."),
    patch_size: int | None = typer.Option(None, help="Resize folder images to this edge (default: the first image's)."),
    group_regex: str | None = typer.Option(None, help="Source group of a file: first capture group on its name (folder sets)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Labelled patch set: labels from annotation polygons, or a folder-per-class image set."""
    import numpy as np

    from wsipipe.learn.patchsets import folder_patch_set, label_store

    cfg = _config(config)
    if annotations is not None:
        labels = label_store(source, annotations, classes.split(",") if classes else None,
                             cfg.train.min_overlap, cfg.train.max_normal_overlap)
        counts = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
        out_console_paths({f"labels {counts} (-1 = unlabelled)": source})
    else:
        if out is None:
            raise typer.BadParameter("--out is required for a folder-per-class set")
        stats = folder_patch_set(source, out, patch_size, group_regex)
        out_console_paths({f"{stats['n_patches']} patches, classes {stats['classes']}, {stats['n_groups']} groups": out})


@app.command()
def augment(
    store_path: Path = typer.Argument(..., metavar="STORE.zarr", help="Patch store to augment."),
    out: Path = typer.Option(..., "--out", "-o", help="Augmented copy (Zarr)."),
    copies: int = typer.Option(1, help="Augmented draws per patch."),
    preview: Path | None = typer.Option(None, help="PNG grid: N samples per transform."),
    samples: int = typer.Option(6, help="Samples per transform in the preview."),
    config: Path | None = ConfigOpt,
) -> None:
    """Write an augmented copy of a patch set (and a preview grid) to inspect the augmentation config."""
    from wsipipe.learn.augment import augment_store

    cfg = _config(config)
    with _progress() as update:
        stats = augment_store(store_path, out, cfg.augment, copies, preview, samples, progress=_one("augment", update))
    out_console_paths({f"{stats['n_patches']} patches ({', '.join(stats['transforms'])})": out,
                       **({"preview": preview} if preview else {})})


@app.command()
def pretrain(
    stores: list[Path] = typer.Argument(..., help="Patch stores (any number; labels are ignored)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder (resumes when it holds one)."),
    method: str | None = typer.Option(None, help="simclr or byol (default pretrain.method)."),
    steps: int | None = typer.Option(None, help="Training steps."),
    arch: str | None = typer.Option(None, help="torchvision architecture of the encoder."),
    probe: list[Path] = typer.Option([], help="Labelled stores for a linear probe after training (split by slide)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Contrastive pretraining (SimCLR / BYOL) of a patch encoder; resumable; optional linear probe."""
    from wsipipe.learn.pretrain import pretrain as run_pretrain, probe_on_sets

    cfg = _config(config, **{"pretrain.method": method, "pretrain.steps": steps, "pretrain.arch": arch})
    with _loss_progress(cfg.pretrain.method) as update:
        result = run_pretrain(stores, out, cfg.pretrain, cfg.augment, progress=update)
    out_console_paths({f"encoder after {result.steps} steps (resumed from {result.resumed_from})": out})
    if probe:
        scores = probe_on_sets(out, probe, cfg.train.seed)
        console.print(f"linear probe: accuracy {scores['accuracy']:.3f}, AUC {scores['auc']:.3f}")


@app.command()
def train(
    stores: list[Path] = typer.Argument(..., help="Labelled patch stores (from `wsipipe patches`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.safetensors and card.json."),
    init: str | None = typer.Option(None, help="scratch, encoder, weights or production."),
    init_path: Path | None = typer.Option(None, help="Encoder checkpoint / weights file for --init."),
    epochs: int | None = typer.Option(None, help="Maximum epochs (early stopping on validation AUC)."),
    arch: str | None = typer.Option(None, help="torchvision architecture."),
    register: bool = typer.Option(False, help="Add the result to the registry (train.registry) as a new version."),
    config: Path | None = ConfigOpt,
) -> None:
    """Fine-tune the patch classifier; held-out metrics into a JSON model card."""
    from wsipipe.learn.train import train_model

    cfg = _config(config, **{"train.init": init, "train.init_path": init_path, "train.epochs": epochs, "train.arch": arch})
    with _loss_progress("train") as update:
        card = train_model(stores, out, cfg, progress=update)
    m = card["test_metrics"]
    console.print(f"test: AUC {m['auc']:.3f}, accuracy {m['accuracy']:.3f}, sensitivity {m['sensitivity']:.3f}, "
                  f"specificity {m['specificity']:.3f}, ECE {m['ece']:.3f} (n={m['n']})", highlight=False)
    out_console_paths({"model": out / "model.safetensors", "model card": out / "card.json"})
    if register:
        from wsipipe.learn.registry import register as add

        console.print(f"registered as {add(cfg.train.registry, out)} in {cfg.train.registry}")


models_app = typer.Typer(no_args_is_help=True, help="The model registry: list, promote.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(registry_dir: Path | None = typer.Option(None, "--registry", help="Registry folder (default train.registry)."),
                config: Path | None = ConfigOpt) -> None:
    """Versions with their test metrics; * marks production."""
    from wsipipe.learn.registry import list_models

    root = registry_dir or _config(config).train.registry
    for e in list_models(root):
        m, card = e["card"].get("test_metrics", {}), e["card"]
        console.print(f"{'*' if e['production'] else ' '} {e['version']}  {card.get('arch')}  classes {card.get('classes')}  "
                      f"AUC {m.get('auc', float('nan')):.4f}  acc {m.get('accuracy', float('nan')):.4f}  "
                      f"split {card.get('test_split_id')}  {card.get('created')}", highlight=False)


@models_app.command("promote")
def models_promote(version: str = typer.Argument(..., help="Version to make production, e.g. v0002."),
                   registry_dir: Path | None = typer.Option(None, "--registry", help="Registry folder (default train.registry)."),
                   metric: str = typer.Option("auc", help="Test metric that must improve."),
                   config: Path | None = ConfigOpt) -> None:
    """Make a version production only if it beats the current one on the same test split."""
    from wsipipe.learn.registry import promote

    root = registry_dir or _config(config).train.registry
    e = promote(root, version, metric)
    out_console_paths({f"production is now {e['version']}": e["weights"]})


def _print_summary(summary: dict) -> None:
    score = summary.get("slide_score", {})
    console.print(
        f"[bold]{summary.get('slide', {}).get('name', '')}[/]: {summary.get('n_patches')} patches, "
        f"decision [bold]{summary.get('decision')}[/] (top-k mean {score.get('top_k_mean')}, max {score.get('max')}), "
        f"tumor area {summary.get('tumor_area_mm2')} mm²",
        highlight=False,
    )


def out_console_paths(paths: dict) -> None:
    for label, path in paths.items():
        console.print(f"{label}: [cyan]{path}[/]", highlight=False)


if __name__ == "__main__":
    main()
