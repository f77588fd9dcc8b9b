"""A folder of versioned models: safetensors weights + JSON model card per version, and a
pointer to the production one (what ``process_archive`` / ``wsipipe run`` should use).

    models/
      registry.json           {"production": "v0002", "history": [{version, at, replaced, metric}, ...]}
      v0001/model.safetensors
      v0001/card.json         written by wsipipe.learn.train.train_model

``promote`` makes a version production only if it beats the current production model on
the same test split (same split identity); loading verifies the weights' sha256 against the
card and never unpickles (safetensors only).
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

from wsipipe.errors import RegistryError
from wsipipe.files import write_atomic
from wsipipe.models.identity import file_sha256

_VERSION = re.compile(r"^v(\d{4,})$")


def _index(root: Path) -> dict:
    path = root / "registry.json"
    return json.loads(path.read_text()) if path.is_file() else {"production": None, "history": []}


def versions(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted((p.name for p in root.iterdir() if _VERSION.match(p.name) and (p / "card.json").is_file()),
                  key=lambda v: int(v[1:])) if root.is_dir() else []


def register(root: str | Path, trained_dir: str | Path) -> str:
    """Copy a trained model folder (model.safetensors + card.json) in as the next version."""
    root, trained_dir = Path(root), Path(trained_dir)
    weights, card_path = trained_dir / "model.safetensors", trained_dir / "card.json"
    if not (weights.is_file() and card_path.is_file()):
        raise RegistryError(trained_dir, "needs model.safetensors and card.json (from `wsipipe train`)")
    card = json.loads(card_path.read_text())
    if card.get("weights_sha256") != file_sha256(weights):
        raise RegistryError(weights, "weights do not match the card's sha256")
    existing = versions(root)
    version = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
    tmp = root / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(weights, tmp / "model.safetensors")
    shutil.copy2(card_path, tmp / "card.json")
    tmp.rename(root / version)  # a version appears whole or not at all
    return version


def entry(root: str | Path, version: str) -> dict:
    root = Path(root)
    folder = root / version
    if not _VERSION.match(version) or not (folder / "card.json").is_file():
        raise RegistryError(root, f"no model version {version!r} (have {', '.join(versions(root)) or 'none'})")
    card = json.loads((folder / "card.json").read_text())
    return {"version": version, "weights": folder / "model.safetensors", "card": card,
            "threshold": card.get("threshold"), "production": _index(root).get("production") == version}


def list_models(root: str | Path) -> list[dict]:
    return [entry(root, v) for v in versions(root)]


def production(root: str | Path | None) -> dict | None:
    if root is None:
        return None
    current = _index(Path(root)).get("production")
    return entry(root, current) if current else None


def promote(root: str | Path, version: str, metric: str = "auc", force: bool = False) -> dict:
    """Make ``version`` production if its test ``metric`` beats the current production's on
    the same test split; otherwise a :class:`RegistryError` saying why (nothing changes)."""
    root = Path(root)
    new = entry(root, version)
    current = production(root)
    score = new["card"].get("test_metrics", {}).get(metric)
    if score is None or score != score:
        raise RegistryError(root / version, f"card has no test {metric}")
    if current is not None and current["version"] != version and not force:
        if current["card"].get("test_split_id") != new["card"].get("test_split_id"):
            raise RegistryError(root / version, f"tested on a different split than production {current['version']}: "
                                "not comparable (retrain on the same slides/groups)")
        old = current["card"]["test_metrics"].get(metric)
        if old is not None and not score > old:
            raise RegistryError(root / version, f"test {metric} {score:.4f} does not beat production "
                                f"{current['version']} ({old:.4f}); not promoted")
    if new["card"].get("weights_sha256") != file_sha256(new["weights"]):
        raise RegistryError(new["weights"], "weights do not match the card's sha256 (changed after training?)")
    index = _index(root)
    index["history"].append({"version": version, "replaced": index.get("production"), "metric": metric, "value": score,
                             "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    index["production"] = version
    write_atomic(root / "registry.json", json.dumps(index, indent=2))
    return entry(root, version)


def production_weights(root: str | Path) -> Path | None:
    """The production model's weights file (None when nothing is promoted yet)."""
    current = production(root)
    return current["weights"] if current else None


def load_version(root: str | Path, version: str | None = None):
    """(model, ModelInfo) of a version (default: production), its sha256 checked against the card."""
    from wsipipe.models.model import load_model

    e = entry(root, version) if version else production(root)
    if e is None:
        raise RegistryError(root, "no production model")
    if e["card"].get("weights_sha256") != file_sha256(e["weights"]):
        raise RegistryError(e["weights"], "weights do not match the card's sha256")
    return load_model(e["weights"], e["card"]["arch"], e["card"]["num_classes"])
