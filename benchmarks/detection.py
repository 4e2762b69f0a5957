"""Detection protocol on the engine's synthetic batches: named families, a development split that
chooses defaults and a test split that reports them.

Each *family* is a kind of cohort (`volumetric.engine.synthetic`): `planted` (one consistent
pattern in 5 of 30 collections, 5 with random anomalies), `noise` (no pattern: false flags),
and `odd-<artefacts>`: `planted` plus one to three healthy collections with a whole-collection
artefact (`with_odd_collections`: global, shifted, noise, scaled, half; `odd-two` = global +
shifted, `odd-three` = scaled + half + noise), the motion-corrupted or mis-registered scans of a
real cohort; `subgroup` = `planted` plus a quarter of N healthy collections sharing one
whole-collection offset (`with_subgroup`: a normal variant, as atrophic or one site's scans; its
members are normal: a flag counts against the method), `subgroup-noise` = the subgroup without a
pattern. Splits: `dev` = seeds 0-9 at the engine tests' shape (N 30, M 64); `test` = seeds
10-29 at that shape *and* seeds 30-39 at another generator setting (N 40, M 96, 6 planted
collections, 8 elements each), never looked at while choosing. The CoDeGraph defaults in
`volumetric.engine.codegraph` are frozen before `--split test` is run; `stop_fence` was chosen on
`dev` (docs/engine.md names the split behind each default).

Per family and method: `alone` = batches where the planted collections are flagged (recall
>= 0.95) and no normal collection is (the odd collections may be: they are anomalous, and a flag
only drops their dependent elements from the base); `normal flagged` = mean normal collections
in outlier communities per batch; collection AUROC (planted + random-anomaly collections vs
normal ones, score = the collection's largest element score) and element AUROC of the planted
pattern against normal elements; `links` = mean links selected. MuSc = mutual scoring at its
default f = 0.3; CoDeGraph with the literal Algorithm 1 stop (`stop_fence=None`, the largest
first link), without the rules of the 2026-12-08 rules study (`unflagged_fraction`,
`max_dependent_share` off: the paper's final f always, diffuse communities filtered) and at its
defaults.

    python benchmarks/detection.py --split dev 2>/dev/null
    python benchmarks/detection.py --split test 2>/dev/null
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from volumetric.engine import CoDeGraph, EngineOptions, mutual_scores
from volumetric.engine.synthetic import CONSISTENT_ANOMALY, NORMAL, synthetic_batch, with_odd_collections, with_subgroup

QUIET = EngineOptions(device="cpu", progress=False)
FAMILIES = {"planted": "", "noise": "", "odd-global": "global", "odd-shifted": "shifted", "odd-noise": "noise",
            "odd-scaled": "scaled", "odd-half": "half", "odd-two": "global+shifted",
            "odd-three": "scaled+half+noise", "subgroup": "", "subgroup-noise": ""}
LESION_FREE = ("noise", "subgroup-noise")
METHODS = {"MuSc f=0.3": None, "CoDeGraph, literal stop": CoDeGraph(stop_fence=None),
           "CoDeGraph, rules off": CoDeGraph(unflagged_fraction=None, max_dependent_share=None),
           "CoDeGraph": CoDeGraph()}


@dataclass(frozen=True)
class Setting:
    """One generator setting of a split: seeds and `synthetic_batch` shape."""

    seeds: range
    n: int = 30
    m: int = 64
    consistent: int = 5
    per_collection: int = 6


SPLITS = {"dev": [Setting(range(0, 10))],
          "test": [Setting(range(10, 30)), Setting(range(30, 40), n=40, m=96, consistent=6, per_collection=8)]}


def batch_of(family: str, setting: Setting, seed: int):
    """(batch, features, odd collections) of one family at one seed."""
    consistent = 0 if family in LESION_FREE else setting.consistent
    batch = synthetic_batch(n=setting.n, m=setting.m, consistent=consistent, per_collection=setting.per_collection,
                            seed=seed)
    if family.startswith("subgroup"):
        return batch, with_subgroup(batch, setting.n // 4, seed)[0], []
    if not FAMILIES[family]:
        return batch, batch.features, []
    features, odd = with_odd_collections(batch, FAMILIES[family], seed)
    return batch, features, odd


def measure(family: str, method: CoDeGraph | None, settings: list[Setting]) -> dict:
    """The family's figures for one method over every seed of the split."""
    alone, normal_flagged, links, collection_auc, element_auc = [], [], [], [], []
    for setting in settings:
        for seed in setting.seeds:
            batch, features, odd = batch_of(family, setting, seed)
            if method is None:
                scores = mutual_scores(features, 0.3, options=QUIET)
                flagged: set[int] = set()
            else:
                result = method(features, options=QUIET)
                scores, flagged = result.scores, set(result.outlier_collections)
                links.append(result.suspicious_links)
            planted = set(batch.consistent)
            normal = flagged - planted - set(odd)
            normal_flagged.append(len(normal))
            if planted:
                alone.append(len(flagged & planted) / len(planted) >= 0.95 and not normal)
                healthy = [i for i in range(len(features)) if i not in odd]
                anomalous = [bool((batch.kind[i] != NORMAL).any()) for i in healthy]
                collection_auc.append(roc_auc_score(anomalous, scores[healthy].amax(1).numpy()))
                keep = (batch.kind == NORMAL) | (batch.kind == CONSISTENT_ANOMALY)
                keep[odd] = False
                element_auc.append(roc_auc_score((batch.kind[keep] == CONSISTENT_ANOMALY).numpy(),
                                                 scores[keep].numpy()))
            else:
                alone.append(not normal)
    return {"batches": len(alone), "alone": int(np.sum(alone)), "normal_flagged": float(np.mean(normal_flagged)),
            "collection_auc": float(np.mean(collection_auc)) if collection_auc else None,
            "element_auc": float(np.mean(element_auc)) if element_auc else None,
            "links": float(np.mean(links)) if links else None}


def main(argv: list[str] | None = None) -> int:
    """Print one markdown row per (family, method) of the split."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=tuple(SPLITS), required=True)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of the families")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = SPLITS[args.split]
    print(f"split {args.split}: " + "; ".join(f"seeds {s.seeds.start}-{s.seeds.stop - 1}, N {s.n}, M {s.m}, "
                                               f"{s.consistent} planted x {s.per_collection}" for s in settings))
    print("| family | method | found alone (or nothing flagged) | normal collections flagged per batch "
          "| collection AUROC | element AUROC (pattern) | links |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        if family not in FAMILIES:
            parser.error(f"unknown family {family!r}; expected {tuple(FAMILIES)}")
        for name, method in METHODS.items():
            row = measure(family, method, settings)
            auc = [f"{100 * row[k]:.1f}" if row[k] is not None else "-" for k in ("collection_auc", "element_auc")]
            links = f"{row['links']:.0f}" if row["links"] is not None else "-"
            flags = (f"{row['alone']} / {row['batches']} | {row['normal_flagged']:.2f}" if method is not None
                     else "- | -")  # MuSc flags nothing
            print(f"| {family} | {name} | {flags} | {auc[0]} | {auc[1]} | {links} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
