"""The commands that build models: ``patches``, ``augment``, ``pretrain``, ``train`` and the registry's
``models list`` / ``models promote``. Torch loads when one of them runs, not before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from wsipipe.cli.console import ConfigOpt, console, error_line, help_when_bare, load_config, loss_progress, one, print_paths, progress
from wsipipe.errors import AnnotationError, RegistryError


def patches(
    source: Path = typer.Argument(..., help="A tiled store (with --annotations) or a folder with one sub-folder per class."),
    annotations: Path | None = typer.Option(None, "--annotations", "-a", help="QuPath GeoJSON for a tiled store."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Zarr store to write (folder sets)."),
    classes: str | None = typer.Option(None, help="Comma-separated classes in index order, background first (default: Normal + the GeoJSON's); "
                                       "NAME=A+B gives class NAME the polygons of annotation classes A and B."),
    patch_size: int | None = typer.Option(None, help="Resize folder images to this edge (default: the first image's)."),
    group_regex: str | None = typer.Option(None, help="Source group of a file: first capture group on its name (folder sets)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Labelled patch set: labels from annotation polygons, or a folder-per-class image set."""
    import numpy as np

    from wsipipe.learn.patchsets import folder_patch_set, label_store

    cfg = load_config(config)
    if not source.exists():
        raise AnnotationError(source, "not found (expected a tiled store or a folder with one sub-folder per class)")
    if annotations is not None:
        labels = label_store(source, annotations, classes.split(",") if classes else None,
                             cfg.train.min_overlap, cfg.train.max_normal_overlap)
        from wsipipe.tiles import store

        info = store.meta(store.open_store(source))[store.META_LABELS]
        for warning in info.get("warnings", []):
            error_line("wsipipe warning: ", warning, "yellow")
        counts = np.bincount(labels.astype(np.int64) + 1, minlength=len(info["classes"]) + 1)
        named = ", ".join(f"{name} {n}" for name, n in zip([*info["classes"], "unlabelled"], [*counts[1:], counts[0]], strict=True))
        print_paths({f"labels: {named}": source})
    else:
        if (source / "zarr.json").is_file():
            raise AnnotationError(source, "is a Zarr store: label a tiled store with --annotations SLIDE.geojson "
                                  "(a folder set is made from a folder of images, one sub-folder per class)")
        if out is None:
            raise typer.BadParameter("--out is required for a folder-per-class set")
        stats = folder_patch_set(source, out, patch_size, group_regex)
        print_paths({f"{stats['n_patches']} patches, classes {stats['classes']}, {stats['n_groups']} groups": out})


def augment(
    store_path: Path = typer.Argument(..., metavar="STORE.zarr", help="Patch store to augment."),
    out: Path = typer.Option(..., "--out", "-o", help="Augmented copy (Zarr)."),
    copies: int = typer.Option(1, min=1, help="Augmented draws per patch."),
    preview: Path | None = typer.Option(None, help="PNG grid: N samples per transform."),
    samples: int = typer.Option(6, min=1, help="Samples per transform in the preview."),
    config: Path | None = ConfigOpt,
) -> None:
    """Write an augmented copy of a patch set (and a preview grid) to inspect the augmentation config."""
    from wsipipe.learn.augment import augment_store

    cfg = load_config(config)
    if out.resolve() == store_path.resolve():
        raise AnnotationError(out, "--out is the patch set itself: the augmented copy would overwrite it; give another path")
    with progress() as update:
        stats = augment_store(store_path, out, cfg.augment, copies, preview, samples, progress=one("augment", update))
    print_paths({f"{stats['n_patches']} patches ({', '.join(stats['transforms'])})": out,
                       **({"preview": preview} if preview else {})})


def pretrain(
    stores: list[Path] = typer.Argument(..., help="Patch stores (any number; labels are ignored)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder (resumes when it holds one)."),
    method: str | None = typer.Option(None, help="simclr, byol or swav (default pretrain.method)."),
    steps: int | None = typer.Option(None, help="Training steps."),
    arch: str | None = typer.Option(None, help="torchvision architecture of the encoder."),
    probe: list[Path] = typer.Option([], help="Labelled stores for a linear probe after training (split by slide; "
                                      "by position within the slide when there is one)."),
    restart: bool = typer.Option(False, "--restart", help="Start over at step 0 in --out, overwriting its checkpoint "
                                 "(needed when the method, architecture, other settings or stores differ from it)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Self-supervised pretraining (SimCLR / BYOL / SwAV) of a patch encoder; resumes up to --steps; optional linear probe."""
    from wsipipe.learn.pretrain import check_probe_sets, pretrain as run_pretrain, probe_on_sets

    cfg = load_config(config, **{"pretrain.method": method, "pretrain.steps": steps, "pretrain.arch": arch})
    check_probe_sets(list[str | Path](probe))
    with loss_progress(cfg.pretrain.method) as update:
        result = run_pretrain(list[str | Path](stores), out, cfg.pretrain, cfg.augment, progress=update, restart=restart)
    if result.resumed_from >= cfg.pretrain.steps and result.resumed_from > 0:
        console.print(f"the checkpoint is already at step {result.resumed_from} (steps {cfg.pretrain.steps}): nothing to run",
                      highlight=False)
    print_paths({f"encoder after {result.steps} steps (resumed from {result.resumed_from})": out})
    if probe:
        scores = probe_on_sets(out, list[str | Path](probe), cfg.train.seed)
        console.print(f"linear probe: accuracy {scores['accuracy']:.3f}, AUC {scores['auc']:.3f} "
                      f"(n={scores['n_train']} fit, {scores['n_test']} scored; split {scores['split']})", highlight=False)


def train(
    stores: list[Path] = typer.Argument(..., help="Labelled patch stores (from `wsipipe patches`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.safetensors and card.json."),
    init: str | None = typer.Option(None, help="scratch, encoder, weights or production."),
    init_path: Path | None = typer.Option(None, help="Encoder checkpoint / weights file for --init."),
    epochs: int | None = typer.Option(None, help="Maximum epochs (early stopping on validation AUC)."),
    arch: str | None = typer.Option(None, help="torchvision architecture."),
    split: str | None = typer.Option(None, help="train,val,test fractions, e.g. 0.6,0.2,0.2 (default train.split)."),
    split_by: str | None = typer.Option(
        None, help="slide (whole slides per split), spatial (blocks of each slide with a gap) or auto: by slide "
        "with at least as many slides as splits, else spatial (default train.split_by)."),
    register: bool = typer.Option(False, help="Add the result to the registry (train.registry) as a new version."),
    features: bool = typer.Option(False, "--features", help="Fit only a linear head on the stores' patch features "
                                  "(embedded with --encoder where missing); the saved classifier is the encoder with that head."),
    encoder: str | None = typer.Option(None, help="With --features: a pretraining checkpoint, a classifier weights file, "
                                       "torchvision:ARCH or timm:NAME (with --weights)."),
    weights: Path | None = typer.Option(None, help="With --features: weights of a torchvision:/timm: encoder (nothing is downloaded)."),
    config: Path | None = ConfigOpt,
) -> None:
    """Fine-tune the patch classifier (or, with --features, a head on stored features); held-out metrics and the
    decision threshold into a JSON model card."""
    from wsipipe.errors import ConfigError
    from wsipipe.learn.train import train_model

    fractions = None
    if split is not None:
        try:
            fractions = tuple(float(v) for v in split.split(","))
        except ValueError:
            raise ConfigError(None, f"--split {split!r}: expected three comma-separated fractions, e.g. 0.6,0.2,0.2") from None
    cfg = load_config(config, **{"train.init": init, "train.init_path": init_path, "train.epochs": epochs, "train.arch": arch,
                                 "train.split": fractions, "train.split_by": split_by})
    if weights is not None and not weights.is_file():  # a missing file is the problem to name, whatever else is off
        from wsipipe.errors import ModelLoadError

        raise ModelLoadError(weights, "weights file not found")
    if features != (encoder is not None):
        raise ConfigError(None, "--features and --encoder SPEC go together: a head is fitted on one encoder's features")
    if features and (init is not None or init_path is not None or arch is not None):
        raise ConfigError(None, "--features takes its architecture and weights from --encoder: drop --init, --init-path, --arch")
    if weights is not None and not features:
        raise ConfigError(None, "--weights is the --encoder's weights file: use it with --features")
    if features:
        from wsipipe.learn.features_head import train_features_head

        def embedded(where: str, stats: dict) -> None:
            if not stats["skipped"]:
                console.print(f"embedded {stats['computed']} patches of {where} in {stats['seconds']:.1f} s", highlight=False)

        card = train_features_head(stores, out, cfg, encoder, weights, on_store=embedded)
    else:
        with loss_progress("train") as update:
            card = train_model(stores, out, cfg, progress=update)
    how, counts = card["split"], {k: v.get("class_counts") for k, v in card["data"]["splits"].items()}
    if how["by"] == "spatial":
        console.print(f"split: spatial (blocks of {how['block_patches']} x {how['block_patches']} patches, "
                      f"{how['dropped_patches']} patches dropped in the gaps): {counts}", highlight=False)
        console.print("held-out metrics are optimistic: val and test are other regions of the same slide(s)",
                      style="yellow", highlight=False)
    else:
        console.print(f"split: by slide: {counts}", highlight=False)
    m = card["test_metrics"]
    at = "" if card.get("threshold") is None else f" at threshold {card['threshold']:.3f} (chosen on val)"
    console.print(f"test: AUC {m['auc']:.3f}, accuracy {m['accuracy']:.3f}, sensitivity {m['sensitivity']:.3f}, "
                  f"specificity {m['specificity']:.3f}, ECE {m['ece']:.3f} (n={m['n']}){at}; best epoch "
                  f"{card['best_epoch']} of {len(card['history'])}", highlight=False)
    print_paths({"model": out / "model.safetensors", "model card": out / "card.json"})
    if register:
        from wsipipe.learn.registry import register as add

        console.print(f"registered as {add(cfg.train.registry, out)} in {cfg.train.registry}")


models_app = typer.Typer(help="Models: the registry (list, promote) and any model file or folder (card, export).")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context) -> None:
    """Models: the registry (list, promote) and any model file or folder (card, export)."""
    help_when_bare(ctx)


@models_app.command("list")
def models_list(registry_dir: Path | None = typer.Option(None, "--registry", help="Registry folder (default train.registry)."),
                config: Path | None = ConfigOpt) -> None:
    """Versions with their test metrics; * marks production."""
    from wsipipe.learn.registry import list_models

    root = registry_dir or load_config(config).train.registry
    if not Path(root).is_dir():
        if registry_dir is not None:  # named on the command line: a typo, not an empty registry
            raise RegistryError(root, "registry folder not found")
        console.print(f"no models registered in {root} yet", highlight=False)
        return
    entries = list_models(root)
    if not entries:
        console.print(f"no models registered in {root} yet", highlight=False)
    for e in entries:
        m, card = e["card"].get("test_metrics", {}), e["card"]
        console.print(f"{'*' if e['production'] else ' '} {e['version']}  {card.get('arch')}  classes {card.get('classes')}  "
                      f"AUC {m.get('auc', float('nan')):.4f}  acc {m.get('accuracy', float('nan')):.4f}  "
                      f"threshold {card.get('threshold')}  "
                      f"split {card.get('test_split_id')}  {card.get('created')}", highlight=False)


@models_app.command("promote")
def models_promote(version: str = typer.Argument(..., help="Version to make production, e.g. v0002."),
                   registry_dir: Path | None = typer.Option(None, "--registry", help="Registry folder (default train.registry)."),
                   metric: str = typer.Option("auc", help="Test metric that must improve."),
                   config: Path | None = ConfigOpt) -> None:
    """Make a version production only if it beats the current one on the same test split."""
    from wsipipe.learn.registry import promote

    root = registry_dir or load_config(config).train.registry
    e = promote(root, version, metric)
    print_paths({f"production is now {e['version']}": e["weights"]})


@models_app.command("card")
def models_card(
    model: Path = typer.Argument(..., metavar="MODEL", help="Weights (.safetensors / .pt state dict), TorchScript file, "
                                 ".pt2 export program, WSInfer model folder, or a folder with card.json."),
    arch: str | None = typer.Option(None, help="Architecture of a bare state dict (torchvision name or timm:<name>)."),
    num_classes: int | None = typer.Option(None, min=1, help="Output columns of a bare state dict."),
) -> None:
    """Print a model's card (JSON): classes, resolution, patch size, normalisation, where it came from.

    The model is loaded (on the CPU), so the card printed is the one a run uses: the card.json
    beside the weights when it describes them, a WSInfer folder's config, else one made from the file."""
    from wsipipe.models.model import load_model

    _, info = load_model(model, arch, num_classes)
    assert info.card is not None
    typer.echo(info.card.to_json())


@models_app.command("export")
def models_export(
    weights: Path = typer.Argument(..., metavar="WEIGHTS", help="The model to export: any file or folder `models card` reads."),
    fmt: str = typer.Option(..., "--format", "-f", help="torchscript (torch.jit.script, else trace) or export (torch.export "
                            "program, .pt2, dynamic batch)."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write; card.json is written beside it."),
    arch: str | None = typer.Option(None, help="Architecture of a bare state dict (torchvision name or timm:<name>)."),
    num_classes: int | None = typer.Option(None, min=1, help="Output columns of a bare state dict."),
) -> None:
    """Write a model as a TorchScript file or a torch.export program, with its card beside it.

    The card is the source's, with the new file's sha256, source and arch; `wsipipe infer --model OUT`
    then runs it as the source model ran (same probabilities)."""
    from wsipipe.models.model import export_model

    info = export_model(weights, fmt, out, arch, num_classes)
    print_paths({f"{fmt} ({info.num_classes} output column(s))": info.path or out, "model card": out.parent / "card.json"})



COMMANDS: list[Callable[..., None]] = [patches, augment, pretrain, train]
