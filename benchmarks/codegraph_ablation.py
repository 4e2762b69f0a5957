"""CoDeGraph ablation: MuSc vs CoDeGraph, and CoDeGraph with each paper stage switched back in turn.

Modelled on the ablation tables of the CoDeGraph paper, on phantom cohorts seen by the
weights-free classical tokens (`volumetric.classical_tokens`), in three regimes:

- `lookalike`: a third of the scans carry 1-3 look-alike lesions at random places (the
  BraTS-METS vs IXI shape; `pipelines.phantom.lookalike_config`);
- `sameplace`: a minority group sharing one lesion at one template place (+ healthy scans);
- `none`: the healthy scans of the look-alike cohort alone (no lesion at all).

Per regime the cohort is generated on the template grid (no head pose or voxel-size variation, so
no registration: the 2 shared cores could not register 120 scans in minutes; elastic warps, bias
field, noise and site intensity scales kept; brain mask = the template's) and tokenised once into
`OUT/<regime>/` (cached: reruns only score), then every variant is scored with `volscan`'s engine
on the same tokens. Printed per variant: patient AUROC and F1-max,
lesion-cube AUROC (token grid, lesion cells vs all other valid cells), Dice (paper protocol:
F1-max threshold on the grid, trilinear upsampling, mean over all scans with a clean scan
without alarm = 1; and over lesion scans only), CoDeGraph's outlier communities (sizes, share
of lesion scans), excluded share of elements and the lesion share of the excluded elements, and
for CoDeGraph the largest change of any element's score against MuSc at the same f (a share of
MuSc's largest score: 0 when nothing is excluded, the lesion-free check). The last row, an
oracle, scores MuSc at CoDeGraph's f against a base without any lesion cube: the most any
exclusion could gain on that cohort.

    python benchmarks/codegraph_ablation.py --out /tmp/volscan-ablation              # all regimes
    python benchmarks/codegraph_ablation.py --out /tmp/a --regimes lookalike --contrast 1.5
    python benchmarks/codegraph_ablation.py --out /tmp/b --regimes none --bias 0      # no bias field
    python benchmarks/codegraph_ablation.py --out /tmp/b --regimes none --bias-correction n4  # N4-corrected
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.maps import upsample_scores
from pipelines.phantom import (Cohort, LesionSettings, PhantomConfig, WarpSettings, generate_cohort, lookalike_config,
                               procedural_head)
from preprocessing.bias_field import correct_bias_field
from preprocessing.io import load_volume
from volumetric.classical_tokens import ClassicalTokenizer, standardize_batch
from volumetric.engine import CoDeGraph, EngineOptions, ScoringConfig, ScoringResult, lnamd, score_collections
from volumetric.engine.mutual import top_k_counts
from volumetric.engine.ranked import ranked_minima
from volumetric.engine.scoring import lnamd_views
from volumetric.metrics import auroc, dice, f1_max, pool_to_grid

log = logging.getLogger("codegraph_ablation")
REGIMES = ("lookalike", "sameplace", "none")
QUIET = EngineOptions(device="cpu", progress=False)


@dataclass
class Batch:
    """Tokens and truth of one regime: `layers` [(N, g, g, g, D)], `valid` (N, g, g, g) bool,
    `cubes` (N, S, S, S) bool lesion masks in the cube, `ids`, `lesion` (N,) bool."""

    layers: list[torch.Tensor]
    valid: torch.Tensor
    cubes: np.ndarray
    ids: list[str]
    lesion: np.ndarray

    def subset(self, keep: np.ndarray) -> "Batch":
        index = torch.from_numpy(np.flatnonzero(keep))
        return Batch([layer[index] for layer in self.layers], self.valid[index], self.cubes[keep],
                     [self.ids[i] for i in index.tolist()], self.lesion[keep])


def variants(f_same: float) -> list[tuple[str, str, ScoringConfig]]:
    """(name, method, config): MuSc at its default and at CoDeGraph's f, CoDeGraph as the paper
    specifies it, then each stage switched back to our earlier engine, and the open choices."""
    paper = ScoringConfig(engine=QUIET)
    cdg = paper.codegraph
    return [
        ("MuSc f=0.3 (MuSc default)", "musc", paper),
        (f"MuSc f={f_same:g} (CoDeGraph's f)", "musc", replace(paper, musc_top_fraction=f_same)),
        ("CoDeGraph (paper)", "codegraph", paper),
        ("  r_ref 0.5 N (was)", "codegraph", replace(paper, codegraph=replace(cdg, reference_fraction=0.5))),
        ("  graph: per-collection average over all views, 1 connection/link (was)", "codegraph",
         replace(paper, codegraph=replace(cdg, graph="averaged"), graph_radii=paper.lnamd_radii)),
        ("  fence: leave-one-out + sqrt floor, k = 3, per pair (was)", "codegraph",
         replace(paper, codegraph=replace(cdg, fence="robust", density="pair"))),
        ("  density: weight per pair, k = 1.5 (was)", "codegraph",
         replace(paper, codegraph=replace(cdg, density="pair", iqr_k=1.5))),
        ("  fence: k = 1.5", "codegraph", replace(paper, codegraph=replace(cdg, iqr_k=1.5))),
        ("  filtering: each community alone (was)", "codegraph",
         replace(paper, codegraph=replace(cdg, filtering="independent"))),
        ("  LNAMD without LayerNorm (was)", "codegraph", replace(paper, layer_norm=False)),
        ("  graph views: r = 1", "codegraph", replace(paper, graph_radii=(1,))),
        ("  graph views: all (layer, r)", "codegraph", replace(paper, graph_radii=paper.lnamd_radii)),
        ("  final score: squared Euclidean", "codegraph", replace(paper, codegraph=replace(cdg, squared=True))),
        ("  coverage 0.95 (was)", "codegraph", replace(paper, codegraph=replace(cdg, coverage=0.95))),
        ("  link stop: largest need, no fence (literal Algorithm 1, was)", "codegraph",
         replace(paper, codegraph=replace(cdg, stop_fence=None))),
        (f"Oracle: MuSc f={f_same:g}, base without lesion cubes (ceiling)", "oracle", paper),
    ]


def cohort_config(regime: str, n: int, size: int, contrast: float, seed: int, *, bias: float | None = None,
                  elastic_mm: float | None = None) -> PhantomConfig:
    """The phantom cohort of a regime (the `none` regime reuses the look-alike cohort), rendered
    on the template grid: no head pose or voxel-size variation, the elastic warp (3 mm) kept.
    `bias` (log-polynomial std of the bias field) and `elastic_mm` override the phantom's
    defaults (0.15, 3 mm); the same seed keeps every other draw (0 still consumes its draws)."""
    warps = WarpSettings(rotation_deg=0.0, scale_range=(1.0, 1.0), shift_mm=0.0, voxel_scale=(1.0, 1.0),
                         orientations=("".join(nib.aff2axcodes(procedural_head(size).affine)),))
    if elastic_mm is not None:
        warps = replace(warps, elastic_mm=elastic_mm)
    if regime in ("lookalike", "none"):
        config = lookalike_config(n, contrast=contrast, seed=seed, size=size, template="procedural")
    else:
        config = PhantomConfig(n_normal=n - n // 6, n_lesion=0, n_consistent=n // 6, seed=seed, size=size,
                               template="procedural", lesions=LesionSettings(radius_mm=(12.0, 20.0), contrast=contrast))
    config = replace(config, warps=warps)
    return config if bias is None else replace(config, bias_strength=bias)


def build_batch(folder: Path, config: PhantomConfig, bias_correction: str = "none", patch: int = 14) -> Batch:
    """Generate and tokenise a cohort into `folder` (tokens cached in tokens.pt, or tokens-n4.pt
    when `bias_correction` is "n4": each scan divided by its N4 bias field, fitted in the brain
    mask, before tokenisation, as `--bias-correction n4` does in the preprocessing chain; `patch`:
    the classical tokens' cube edge, a suffix -p<patch> on the cache file when not 14). The
    scans are on the template grid already, so the cube is the image and the brain mask the
    template's."""
    cache = folder / ("tokens" + ("" if bias_correction == "none" else f"-{bias_correction}")
                      + ("" if patch == 14 else f"-p{patch}") + ".pt")
    size = config.size
    description = folder / "cohort" / "cohort.json"
    if isinstance(config, PhantomConfig) and description.is_file():
        # a folder holds one cohort: refuse to score a cached cohort made with other settings
        made = json.loads(description.read_text(encoding="utf-8"))["config"]
        wanted = json.loads(json.dumps(asdict(config)))
        if any(wanted.get(key) != value for key, value in made.items()):  # keys added later: defaults
            raise SystemExit(f"{folder}: holds a cohort made with other settings; use another --out")
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        cubes = np.unpackbits(saved["cubes"], axis=1)[:, : size**3].reshape(-1, size, size, size).astype(bool)
        return Batch(saved["layers"], saved["valid"], cubes, saved["ids"], saved["lesion"])
    done = (folder / "cohort" / "cohort.json").is_file()
    cohort = Cohort.load(folder / "cohort") if done else generate_cohort(folder / "cohort", config)
    ids = cohort.subjects
    brain = load_volume(cohort.template_dir / "brain_mask.nii.gz").array > 0
    tokenizer = ClassicalTokenizer(patch=patch)
    sets, cubes = [], []
    for sid in tqdm(ids, desc="tokens", unit="scan"):
        scan = load_volume(cohort.image(sid))
        image = scan.array.astype(np.float32)
        if bias_correction == "n4":
            spacing = tuple(float(v) for v in scan.spacing)
            image = correct_bias_field(image, brain, spacing, name=str(cohort.image(sid)))
        sets.append(tokenizer(image, brain))
        cubes.append(load_volume(cohort.label(sid)).array > 0)
    layers = [torch.stack([s.layers[i] for s in sets]) for i in range(len(sets[0].layers))]
    valid = ~torch.stack([s.void for s in sets])
    cubes_array = np.stack(cubes)
    lesion = np.array([cohort.groups[s] != "normal" for s in ids])
    packed = np.packbits(cubes_array.reshape(len(ids), -1), axis=1)
    torch.save({"layers": layers, "valid": valid, "cubes": packed, "ids": ids, "lesion": lesion}, cache)
    return Batch(layers, valid, cubes_array, ids, lesion)


def oracle_scores(layers: list[torch.Tensor], valid: torch.Tensor, truth: np.ndarray, config: ScoringConfig) -> torch.Tensor:
    """(N, *grid) mutual scores at CoDeGraph's f from `layers` [(N, *grid, D)] and `valid`
    (N, *grid) bool against a base without any lesion cube (`truth`, (N, *grid) bool): what a
    perfect exclusion would reach, the ceiling of every CoDeGraph variant (it also removes
    look-alikes that no burn-out could reveal). CoDeGraph's own final pass with the lesion cubes
    as its exclusions: same LNAMD views, k and engine options as the engine's MuSc at that f
    (identical to it when `truth` is all False)."""
    n = valid.shape[0]
    flat_valid = valid.reshape(n, -1)
    k = int(top_k_counts(torch.tensor([n]), config.codegraph.top_fraction))
    excluded = torch.from_numpy(truth).reshape(n, -1) & flat_valid
    views = partial(lnamd_views, layers, valid, config.lnamd_radii, config.layer_norm)
    scores = torch.full(flat_valid.shape, torch.nan)
    scores[flat_valid] = config.codegraph._final_scores(views, flat_valid, excluded, None, k, config.engine)
    return scores.reshape(valid.shape)


def evaluate(batch: Batch, method: str, config: ScoringConfig) -> dict:
    """Score one variant ("musc", "codegraph" or "oracle": `oracle_scores`) and measure it."""
    layers = standardize_batch(batch.layers, batch.valid)
    grid = tuple(batch.valid.shape[1:])
    truth = np.stack([pool_to_grid(c, grid) for c in batch.cubes])
    start = time.perf_counter()
    if method == "oracle":
        element = oracle_scores(layers, batch.valid, truth, config)
        result = ScoringResult(element, element.nan_to_num(-torch.inf).flatten(1).amax(1), None, "musc")
    else:
        result = score_collections(layers, batch.valid, method, config)
    seconds = time.perf_counter() - start
    scores = result.element_scores.numpy()
    valid = batch.valid.numpy()
    row: dict = {"seconds": seconds}
    patient = result.collection_scores.numpy()
    if batch.lesion.any() and not batch.lesion.all():
        row["patient_auroc"] = auroc(patient, batch.lesion)
        row["patient_f1"] = f1_max(patient, batch.lesion).f1
    if truth[valid].any():
        row["cube_auroc"] = auroc(scores[valid], truth[valid])
    threshold = f1_max(np.nan_to_num(scores, nan=0.0), truth).threshold if truth.any() else np.nanmax(scores) + 1.0
    dices = [dice(upsample_scores(scores[i], batch.cubes.shape[1]) >= threshold, batch.cubes[i]) for i in range(len(scores))]
    row["dice_all"] = float(np.mean(dices))
    if batch.lesion.any():
        row["dice_lesion"] = float(np.mean([d for d, les in zip(dices, batch.lesion) if les]))
    row["_scores"] = scores  # for the same-f comparison in `main`; not saved
    graph = result.codegraph
    if graph is not None:
        outliers = [graph.communities[c] for c in graph.outlier_communities]
        members = [i for c in outliers for i in c]
        excluded = graph.excluded.reshape(truth.shape).numpy()
        row.update(
            communities=len(graph.communities),
            outlier_sizes=[len(c) for c in outliers],
            diffuse_sizes=[len(graph.communities[c]) for c in graph.diffuse_communities],
            outlier_lesion_share=float(np.mean(batch.lesion[members])) if members else None,
            outlier_members=[int(i) for i in members],
            # the densest communities: (size, lesion scans, density, fence), why one is flagged or not
            densest=[(len(graph.communities[c]), int(batch.lesion[graph.communities[c]].sum()),
                      round(graph.densities[c], 1), round(graph.density_fences[c], 1))
                     for c in sorted(range(len(graph.communities)), key=lambda c: -graph.densities[c])[:3]],
            lesion_scans_in_outliers=int(batch.lesion[members].sum()) if members else 0,
            excluded_share=graph.excluded_fraction,
            excluded_lesion_share=float(truth[excluded].mean()) if excluded.any() else None,
            links=graph.suspicious_links,
            reference_rank=graph.reference_rank,
        )
    return row


def diagnose(batch: Batch, config: ScoringConfig) -> dict:
    """How lesion and healthy cubes burn out with r = 1 graph views (the earlier default; under the
    per-pair fence no lesion community was flagged with them, under the current fence one is:
    docs/engine.md): the burn-out in their sorted mutual similarity vectors (layer-wise sorted, averaged, as CoDeGraph
    reads them), and the lesion share of the most suspicious cubes."""
    layers = standardize_batch(batch.layers, batch.valid)
    n = len(batch.ids)
    valid = batch.valid.reshape(n, -1)
    graph_radius = 1  # the r = 1 graph of the earlier default
    views = [lnamd(layer, graph_radius, batch.valid, layer_norm=config.layer_norm).reshape(n, -1, layer.shape[-1])
             for layer in layers]
    ranked = [ranked_minima(v, valid, n - 1, options=QUIET) for v in views]
    averaged = sum(r.distances for r in ranked) / len(ranked)  # (T, N-1), layer-wise sorted
    truth = torch.from_numpy(np.stack([pool_to_grid(c, tuple(batch.valid.shape[1:])) for c in batch.cubes]))
    lesion_cube = truth.reshape(n, -1)[valid]
    owner = torch.arange(n).repeat_interleave(valid.sum(1))
    lesion_scan = torch.from_numpy(batch.lesion)[owner]
    r_ref = config.codegraph.reference_rank(n)
    growth = torch.log(averaged[:, 1:] / averaged[:, :-1].clamp_min(1e-8))  # tau_i, i = 1..N-2
    jump = growth.argmax(1) + 1  # rank after which the largest relative jump happens
    ratio = averaged[:, : r_ref - 1].clamp_min(1e-8).pow(1 - config.codegraph.eps) / averaged[:, r_ref - 1 : r_ref]
    best = ratio.amin(1)
    groups = {"lesion cubes": lesion_cube, "healthy cubes of lesion scans": ~lesion_cube & lesion_scan,
              "cubes of healthy scans": ~lesion_scan}
    facts: dict = {"r_ref": r_ref, "lesion_scans": int(batch.lesion.sum())}
    for name, mask in groups.items():
        if mask.any():
            facts[name] = {
                "count": int(mask.sum()),
                "median largest-jump rank": float(jump[mask].float().median()),
                "median min ratio": float(best[mask].median()),
                "median d_(1)/d_(r_ref)": float((averaged[mask, 0] / averaged[mask, r_ref - 1]).median()),
            }
    cutoff = torch.quantile(best, 0.05)
    facts["lesion share of the 5 % most suspicious cubes"] = float(lesion_cube[best <= cutoff].float().mean())
    facts["lesion share of all cubes"] = float(lesion_cube.float().mean())
    return facts


def same_f_difference(scores: np.ndarray, reference: np.ndarray) -> float:
    """Largest |score - MuSc's score at the same f| over all valid elements, as a share of
    MuSc's largest score, for CoDeGraph and oracle rows (0 where nothing is excluded: the two are
    then the same scoring)."""
    valid = np.isfinite(reference)
    return float(np.abs(scores[valid] - reference[valid]).max() / np.abs(reference[valid]).max())


def pct(value: object) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(regime: str, rows: list[tuple[str, dict]]) -> str:
    """Markdown table of one regime."""
    lines = [
        f"**{regime}**",
        "",
        "| variant | patient AUROC | F1-max | cube AUROC | Dice all | Dice lesion | outlier communities (lesion share) "
        "| excluded % (lesion %) | max score change vs MuSc same f % | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        communities = "-"
        if "communities" in r:
            communities = f"{r['outlier_sizes']} of {r['communities']} ({pct(r['outlier_lesion_share'])})"
        excluded = "-" if "excluded_share" not in r else f"{pct(r['excluded_share'])} ({pct(r['excluded_lesion_share'])})"
        lines.append(
            f"| {name.strip()} | {pct(r.get('patient_auroc'))} | {pct(r.get('patient_f1'))} | {pct(r.get('cube_auroc'))} "
            f"| {pct(r['dice_all'])} | {pct(r.get('dice_lesion'))} | {communities} | {excluded} "
            f"| {pct(r.get('same_f_difference'))} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder (<regime>/cohort, tokens.pt; ablation-<regimes>.json)")
    parser.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of {REGIMES}")
    parser.add_argument("--n", type=int, default=60, help="scans per cohort (a third look-alike; a sixth same-place)")
    parser.add_argument("--cube", type=int, default=112, help="cube edge in voxels (multiple of 14)")
    parser.add_argument("--contrast", type=float, default=1.5, help="lesion contrast multiplier (1.5 = brighter than CSF)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias", type=float, default=None, help="bias-field strength (phantom default 0.15; 0 = none)")
    parser.add_argument("--bias-correction", choices=("none", "n4"), default="none",
                        help="N4 bias-field correction of every scan before tokenisation (default none)")
    parser.add_argument("--elastic-mm", type=float, default=None, help="elastic warp std in mm (default 3; 0 = none)")
    parser.add_argument("--diagnose", action="store_true", help="print the burn-out evidence per regime")
    parser.add_argument("--only", default=None, help="comma-separated variant name prefixes to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": vars(args), "regimes": {}}
    f_same = CoDeGraph().top_fraction
    for regime in args.regimes.split(","):
        if regime not in REGIMES:
            parser.error(f"unknown regime {regime!r}; expected {REGIMES}")
        source = "lookalike" if regime == "none" else regime
        config = cohort_config(source, args.n, args.cube, args.contrast, args.seed, bias=args.bias,
                               elastic_mm=args.elastic_mm)
        batch = build_batch(out / source, config, args.bias_correction)
        if regime == "none":
            batch = batch.subset(~batch.lesion)
        if args.diagnose:
            facts = diagnose(batch, ScoringConfig(engine=QUIET))
            results.setdefault("diagnosis", {})[regime] = facts
            print(f"\n{regime} burn-out evidence:", json.dumps(facts, indent=1))
        rows = []
        same_f = None  # element scores of MuSc at CoDeGraph's f
        for name, method, scoring in variants(f_same):
            if args.only and not any(name.strip().startswith(p) for p in args.only.split(",")):
                continue
            row = evaluate(batch, method, scoring)
            scores = row.pop("_scores")
            if method == "musc" and scoring.musc_top_fraction == f_same:
                same_f = scores
            elif method in ("codegraph", "oracle") and same_f is not None:
                row["same_f_difference"] = same_f_difference(scores, same_f)
            rows.append((name, row))
            log.warning("%s / %s: %s", regime, name.strip(), row)
        results["regimes"][regime] = {"n": len(batch.ids), "lesion_scans": int(batch.lesion.sum()), "rows": rows}
        print(f"\n{regime}: {len(batch.ids)} scans, {int(batch.lesion.sum())} with lesions, grid {tuple(batch.valid.shape[1:])}, "
              f"{int(batch.valid.sum())} valid cubes")
        print(table(regime, rows))
    suffix = "" if args.bias_correction == "none" else f"-{args.bias_correction}"
    (out / f"ablation-{args.regimes.replace(',', '-')}{suffix}.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
