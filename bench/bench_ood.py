"""How often the out-of-domain flag fires on slides like the demo model's training slide, and
on the real slides it never saw.

    python bench/bench_ood.py [--out bench/results/ood] [--slides 10] [--size 12000 9000]

The demo model exactly as ``make demo`` trains it (``run.pipeline.train_demo_model`` with the
default config: ResNet18, 3 epochs, 224-px patches at 0.5 µm/px, on the generated slide of
seed 1, 12000 x 9000 px at 0.5 µm/px), its card holding the training domain. Then, through
``run_slide``: ``--slides`` generated slides of the same size with other seeds (held out: the
false-flag rate is how many of them get ``out_of_domain``), the real CMU-1 crop (0.499 µm/px
in the file) and the real TCGA scan (no mpp in the file: ``mpp_override`` 0.25). Prints a table
(share of each slide's analysed patches beyond the training p99, median distance, decision,
flag) and writes bench/results/ood.json. The model and slides are reused from ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import write_results  # noqa: E402
from wsipipe.config import load_config  # noqa: E402
from wsipipe.models.card import read_card  # noqa: E402
from wsipipe.run.pipeline import run_slide, train_demo_model  # noqa: E402
from wsipipe.slides.synth import write_synthetic_slide  # noqa: E402

SLIDES = ROOT.parent / "shared" / "data" / "slides"
HELD_OUT_SEEDS = range(101, 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ood")
    ap.add_argument("--slides", type=int, default=10, help="held-out generated slides (other seeds)")
    ap.add_argument("--size", type=int, nargs=2, default=(12000, 9000), help="generated slide width height, px")
    args = ap.parse_args()
    out: Path = args.out
    (out / "slides").mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"inference.device": "cpu", "export.ome_zarr": False})
    width, height = args.size

    def generated(name: str, seed: int) -> Path:
        path = out / "slides" / f"{name}-{width}x{height}.svs"
        if not (path.exists() and path.with_suffix(".geojson").exists()):
            write_synthetic_slide(path, width, height, mpp=0.5, seed=seed)
        return path

    t0 = time.perf_counter()
    train = generated("demo-train", 1)  # as run_demo: seed 1 trains
    weights = out / "model" / f"demo-{cfg.model.arch_for_training}.safetensors"
    if not weights.exists():
        (out / "model").mkdir(parents=True, exist_ok=True)
        weights = train_demo_model(train, train.with_suffix(".geojson"), out / "model", cfg)
    card = read_card(out / "model" / "card.json")
    assert card.domain is not None
    print(f"model: {weights} ({time.perf_counter() - t0:.0f} s); trained on: {card.training_data}")
    print(f"domain: {card.domain['n_fit']} patches fitted, {card.domain['n_held_out']} held out; "
          f"held-out distance p50 {card.domain['quantiles']['p50']:.3f}, p99 {card.domain['quantiles']['p99']:.3f}")

    runs = [(f"generated seed {s}", generated(f"held-{s}", s), None) for s in list(HELD_OUT_SEEDS)[: args.slides]]
    runs += [("CMU-1 (real, 0.499 µm/px)", SLIDES / "cmu-1-small-region.svs", None),
             ("TCGA CR-7395 (real, override 0.25)", SLIDES / "tcga-cr-7395-01a-01-ts1.svs", 0.25)]
    rows = []
    print("\n| slide | analysed patches | beyond training p99 | median distance | decision | out_of_domain |")
    print("|---|---:|---:|---:|---|---|")
    for label, path, override in runs:
        run_cfg = cfg.model_copy(update={"mpp_override": override}) if override else cfg
        summary = run_slide(path, out / "results", run_cfg, weights, force=True).summary
        d = summary["domain"]
        rows.append({"slide": label, "path": str(path), "n_patches": d["n_patches"], "fraction_beyond": d["fraction_beyond"],
                     "median_distance": d["median_distance"], "decision": summary["decision"],
                     "out_of_domain": d["out_of_domain"]})
        print(f"| {label} | {d['n_patches']} | {d['fraction_beyond']:.1%} | {d['median_distance']:.2f} | "
              f"{summary['decision']} | {'**flagged**' if d['out_of_domain'] else 'no'} |", flush=True)
    generated_rows = [r for r in rows if r["slide"].startswith("generated")]
    false_flags = sum(r["out_of_domain"] for r in generated_rows)
    real = [r for r in rows if not r["slide"].startswith("generated")]
    print(f"\nfalse-flag rate on held-out generated slides: {false_flags}/{len(generated_rows)}; "
          f"max share beyond p99 {max(r['fraction_beyond'] for r in generated_rows):.1%}")
    print(f"real slides flagged: {sum(r['out_of_domain'] for r in real)}/{len(real)}; "
          f"({time.perf_counter() - t0:.0f} s in all)")
    write_results("ood", {"model": str(weights), "domain_quantiles": card.domain["quantiles"], "rows": rows,
                          "false_flags": false_flags, "held_out_slides": len(generated_rows)})


if __name__ == "__main__":
    main()
