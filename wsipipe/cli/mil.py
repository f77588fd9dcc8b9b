"""Slide-level models from slide labels: ``embed`` (patch features into stores) and ``mil train``
(a gated-attention MIL model); ``wsipipe run --mil`` applies one. Torch loads when they run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from wsipipe.cli.console import ConfigOpt, DeviceOpt, SetOpt, console, help_when_bare, load_config, one, print_paths, progress
from wsipipe.errors import writing_outputs


def embed(
    stores: list[Path] = typer.Argument(..., metavar="STORE...", help="Stores written by `wsipipe tile` (or `wsipipe run`)."),
    encoder: str = typer.Option(..., "--encoder", "-e", help="A pretraining checkpoint (folder or encoder.safetensors), "
                                "a classifier weights file (its penultimate layer), torchvision:ARCH or timm:NAME."),
    weights: Path | None = typer.Option(None, "--weights", "-w", help="Weights file for torchvision:ARCH / timm:NAME (nothing is downloaded)."),
    batch_size: int | None = typer.Option(None, help="Patches per batch (default inference.batch_size)."),
    device: str | None = DeviceOpt,
    overrides: list[str] = SetOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Patch embeddings into each store (`features`, float16); resumable, skipped when present."""
    from wsipipe.learn.encoders import load_encoder_spec
    from wsipipe.models.embed import embed_store

    from wsipipe.tiles import store

    cfg = load_config(config, overrides, **{"inference.batch_size": batch_size, "inference.device": device})
    for path in stores:  # a mistyped store fails before the encoder loads
        store.open_store(path, mode="r")
    net, identity = load_encoder_spec(encoder, weights)
    done: dict[str, Path] = {}
    with progress() as update:
        for path in stores:
            with writing_outputs(path):
                stats = embed_store(path, net, identity, cfg.inference, progress=one(_bar_name(path), update))
            done[f"features ({stats['n']} x {stats['dim']}{', already there' if stats['skipped'] else ''})"
                 if len(stores) == 1 else f"{path} ({stats['n']} x {stats['dim']})"] = path
    console.print(f"encoder {identity['kind']} {identity['arch']} ({identity['sha256'][:12]}), {identity['dim']} features per patch",
                  highlight=False)
    print_paths(done)


def _bar_name(path: Path) -> str:
    """A store's bar: its name, or its slide folder's for a `wsipipe run` store (all named patches.zarr)."""
    name = path.resolve().parent.name if path.name == "patches.zarr" else path.name
    return f"embed {name[:32]}"


mil_app = typer.Typer(help="Slide-level attention-MIL models: train.")


@mil_app.callback(invoke_without_command=True)
def mil(ctx: typer.Context) -> None:
    """Slide-level attention-MIL models: train."""
    help_when_bare(ctx)


@mil_app.command("train")
def mil_train(
    stores: list[Path] = typer.Argument(..., metavar="STORE...", help="Embedded stores (`wsipipe embed`)."),
    labels: Path = typer.Option(..., "--labels", "-l", help="CSV: slide, label (0/1 or two class names), optional patient."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (model.safetensors, card.json, the encoder)."),
    folds: int | None = typer.Option(None, "--folds", help="Cross-validation folds (mil.folds; default 5)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (mil.epochs; default 40)."),
    positive: str | None = typer.Option(None, "--positive", help="The positive class name (default 1, else the last name sorted)."),
    registry: Path | None = typer.Option(None, "--registry", help="Also register the model as the next version of this registry folder."),
    overrides: list[str] = SetOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Cross-validated gated-attention MIL on slide labels, then a final model on every slide."""
    from wsipipe.learn.mil import train_mil

    cfg = load_config(config, overrides, **{"mil.folds": folds, "mil.epochs": epochs})
    with progress() as update, writing_outputs(out):
        card = train_mil(stores, labels, out, cfg.mil, positive=positive, progress=update)
    cv = card["cv"]
    folds_text = ", ".join(f"{v:.3f}" for v in cv["fold_auc"])
    console.print(
        f"{len(card['training_slides'])} slides, {cv['folds']}-fold CV by {cv['split_by']}: AUC {_num(cv['auc_mean'])} "
        f"± {_num(cv['auc_std'])} (folds {folds_text or '-'}), held-out AUC {_num(cv['held_out_auc'])}, "
        f"threshold {_num(card['threshold'])}", highlight=False,
    )
    paths = {"MIL model": out}
    if registry is not None:
        from wsipipe.learn.registry import register

        version = register(registry, out)
        paths[f"registered as {version}"] = registry / version
    print_paths(paths)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


COMMANDS: list[Callable[..., None]] = [embed]
