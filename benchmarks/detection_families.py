"""Detection protocol on phantom cohort families: a development split that chooses, a test split that reports.

Each *family* is a kind of cohort made by `volscan phantom` (`pipelines.phantom`), rendered on the
template grid and tokenised with the classical tokens exactly as `codegraph_ablation.py` does
(same `build_batch`, `evaluate`; N4 before tokens, as `--bias-correction auto` does for scans
volscan registers). Lesion families hold N scans, a third with 1-3 look-alike lesions:

- `lookalike`: the look-alike regime alone;
- `lookalike+sites`: scanner sites with their own response curve, noise, blur and bias
  (`SiteSettings`), scans assigned to sites in turn;
- `lookalike+artefacts`: three healthy scans with whole-scan artefacts (kinds in turn);
- `lookalike+normal-variation`: a healthy subgroup with enlarged ventricles and a thinner cortex;
- `dark`: the lesions mirrored darker than white matter (`--polarity dark`);
- `size-range`: lesion radii from small to large.

Lesion-free families are the healthy scans of a lesion family's cohort (no extra cohort to
make): `sites`, `artefacts` (the artefact scans are anomalous and may be flagged; the other
healthy scans may not), `normal-variation`.

Splits (seed sets disjoint): `dev` = seeds 0, 4, 5 at setting A (contrast 1.0, radius 12-20 mm,
three default sites, artefacts ghosting / spike / wrap, 25 % atrophic with ventricles x 2 and 2 mm cortex, sizes 4-20 mm);
`test` = seeds 1-3 at setting B (contrast 0.9, radius 10-18 mm, two sites with wider ranges,
artefacts missing-slices / contrast / ghosting, 30 % atrophic with ventricles x 2.5 and 3 mm
cortex, sizes 2-16 mm), never looked at while choosing. The dev split also scores the open
choices of the rules study (`CANDIDATES`: the final pass's f when nothing is excluded or always,
diffuse communities set aside; docs/results/2026-12-08-detection-rules.md); the test split
the defaults only. (The 2026-12-07 families study's dev rows, graph views r = 1 / all and the
literal link stop, are `codegraph_ablation.py` rows.)

Per family and seed: patient AUROC of MuSc at its default f = 0.3 and of CoDeGraph; Dice over
lesion scans (paper protocol, `codegraph_ablation.evaluate`); CoDeGraph's outlier communities
(sizes) and their lesion share, and the diffuse communities it set aside
(`max_dependent_share`); the flagged healthy scans (artefact scans apart) and the largest rise of
their scan score over MuSc at the f of CoDeGraph's final pass (what a flag costs: 0 where nothing
is flagged); the densest communities (size, lesion scans, density, fence) for the
diagnosis where CoDeGraph is below MuSc. Results are cached per (family, seed, N) in
OUT/<split>/results-<cube>.json, so a run can be stopped and continued; the table of every cached
row is written to OUT/<split>/table-<cube>.md and printed.

    python benchmarks/detection_families.py --out /tmp/families --split dev
    python benchmarks/detection_families.py --out /tmp/families --split test --seeds 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from codegraph_ablation import QUIET, Batch, build_batch, cohort_config, evaluate, pct
from pipelines.phantom import AtrophySettings, Cohort, PhantomConfig, SiteSettings
from volumetric.engine import ScoringConfig

log = logging.getLogger("detection_families")


@dataclass(frozen=True)
class Setting:
    """The generator settings of one split (what differs between dev and test besides seeds)."""

    seeds: tuple[int, ...]
    contrast: float
    radius_mm: tuple[float, float]
    size_range_mm: tuple[float, float]
    sites: SiteSettings
    n_sites: int
    artefacts: tuple[str, ...]
    atrophy: AtrophySettings


SPLITS = {
    "dev": Setting((0, 4, 5), 1.0, (12.0, 20.0), (4.0, 20.0), SiteSettings(), 3, ("ghosting", "spike", "wrap"),
                   AtrophySettings(0.25, 2.0, 2.0)),
    "test": Setting((1, 2, 3), 0.9, (10.0, 18.0), (2.0, 16.0),
                    SiteSettings(gamma=(0.75, 1.3), noise=(0.02, 0.07), blur_mm=(0.5, 3.0), bias=(0.1, 0.35)), 2,
                    ("missing-slices", "contrast", "ghosting"), AtrophySettings(0.3, 2.5, 3.0)),
}
# family -> (cohort it is drawn from, lesion-free: the healthy scans only)
FAMILIES = {
    "lookalike": ("lookalike", False),
    "lookalike+sites": ("lookalike+sites", False),
    "lookalike+artefacts": ("lookalike+artefacts", False),
    "lookalike+normal-variation": ("lookalike+normal-variation", False),
    "dark": ("dark", False),
    "size-range": ("size-range", False),
    "sites": ("lookalike+sites", True),
    "artefacts": ("lookalike+artefacts", True),
    "normal-variation": ("lookalike+normal-variation", True),
}


# the open choices of the 2026-12-08 rules study (dev only), as explicit CoDeGraph fields:
# A0 the paper's final f = 0.1 always; A1 nothing excluded -> MuSc at f = 0.3; A2 final pass at
# f = 0.3; B1 diffuse communities (dependent share above DIFFUSE_SHARE) not filtered
DIFFUSE_SHARE = 0.8
CANDIDATES = {
    "A0": {},
    "A1": {"unflagged_fraction": 0.3},
    "A2": {"final_fraction": 0.3},
    "A0+B1": {"max_dependent_share": DIFFUSE_SHARE},
    "A1+B1": {"unflagged_fraction": 0.3, "max_dependent_share": DIFFUSE_SHARE},
    "A2+B1": {"final_fraction": 0.3, "max_dependent_share": DIFFUSE_SHARE},
}


def methods(split: str) -> dict[str, tuple[str, ScoringConfig]]:
    """(method, config) per row name: MuSc at its default and at CoDeGraph's f, CoDeGraph at its
    defaults; on dev also the open choices (`CANDIDATES`, every other rule field off)."""
    base = ScoringConfig(engine=QUIET)
    rows = {"MuSc": ("musc", base),
            "MuSc same f": ("musc", replace(base, musc_top_fraction=base.codegraph.top_fraction)),
            "CoDeGraph": ("codegraph", base)}
    if split == "dev":
        paper = replace(base.codegraph, final_fraction=None, unflagged_fraction=None, max_dependent_share=None)
        rows |= {f"CoDeGraph {name}": ("codegraph", replace(base, codegraph=replace(paper, **fields)))
                 for name, fields in CANDIDATES.items()}
    return rows


def family_config(cohort: str, setting: Setting, seed: int, n: int, cube: int) -> PhantomConfig:
    """The phantom cohort `cohort` of a split at one seed (template grid, as the ablation's)."""
    config = cohort_config("lookalike", n, cube, setting.contrast, seed)
    config = replace(config, lesions=replace(config.lesions, radius_mm=setting.radius_mm))
    if cohort == "lookalike+sites":
        return replace(config, site_profiles=setting.sites, n_sites=setting.n_sites)
    if cohort == "lookalike+artefacts":
        return replace(config, artefact_scans=len(setting.artefacts), artefacts=setting.artefacts)
    if cohort == "lookalike+normal-variation":
        return replace(config, atrophy=setting.atrophy)
    if cohort == "dark":
        return replace(config, lesions=replace(config.lesions, polarity="dark"))
    if cohort == "size-range":
        return replace(config, lesions=replace(config.lesions, radius_mm=setting.size_range_mm))
    return config


def measure(batch: Batch, odd: np.ndarray, split: str) -> dict:
    """Every method's figures on one batch; `odd` (N,) bool marks scans allowed to be flagged
    without counting as healthy flags (artefact scans)."""
    rows: dict = {}
    patients: dict[str, np.ndarray] = {}
    done: dict = {}  # a row whose config equals an earlier one's is not scored twice
    for name, (method, config) in methods(split).items():
        key = (method, config)
        if key in done:
            rows[name] = rows[done[key]]
            continue
        done[key] = name
        row = evaluate(batch, method, config)
        scores = row.pop("_scores")
        patients[name] = np.nanmax(scores.reshape(len(scores), -1), axis=1)
        if method == "codegraph":
            # the rise is against MuSc at the f of CoDeGraph's final pass (what the exclusion did)
            graph = config.codegraph
            final_f = graph.final_fraction or graph.top_fraction
            reference = patients["MuSc" if final_f == config.musc_top_fraction else "MuSc same f"]
            healthy = [i for i in row["outlier_members"] if not batch.lesion[i] and not odd[i]]
            row["healthy_flagged"] = len(healthy)
            rise = patients[name][healthy] / reference[healthy] - 1.0
            row["healthy_rise"] = float(np.max(rise)) if healthy else 0.0
        rows[name] = row
    return rows


def run_family(family: str, split: str, seed: int, out: Path, n: int, cube: int) -> dict:
    """Make (or reuse) the family's cohort and tokens at `seed`, and measure every method."""
    cohort, lesion_free = FAMILIES[family]
    folder = out / f"{cohort}-n{n}-s{seed}-{split}"
    batch = build_batch(folder, family_config(cohort, SPLITS[split], seed, n, cube), "n4")
    subjects = Cohort.load(folder / "cohort").info["subjects"]
    odd = np.array([bool(subjects[i].get("artefact")) for i in batch.ids])  # key absent in older cohorts
    if lesion_free:
        odd = odd[~batch.lesion]
        batch = batch.subset(~batch.lesion)
    return {"n": len(batch.ids), "lesion_scans": int(batch.lesion.sum()), "odd_scans": int(odd.sum()),
            "rows": measure(batch, odd, split)}


def table(split: str, results: dict) -> str:
    """Markdown table: one line per (family, seed, N)."""
    names = [n for n in methods(split) if n.startswith("CoDeGraph ")]
    head = ("| family | seed | N (lesion, odd) | patient AUROC MuSc / CoDeGraph | Dice lesion MuSc / CoDeGraph "
            "| flagged communities (lesion share %) | diffuse communities | healthy flagged (score rise %) "
            "| densest: size, lesion, density, fence |")
    extra = "".join(f" {n}: AUROC, Dice lesion, flagged, diffuse, healthy (rise %) |" for n in names)
    lines = [head + extra, "|---" * (9 + len(names)) + "|"]
    for key in sorted(results, key=lambda k: (list(FAMILIES).index(k.split(":")[0]), k)):
        family, seed, _ = key.split(":")
        r = results[key]
        rows = r["rows"]
        musc, cdg = rows["MuSc"], rows["CoDeGraph"]
        densest = "; ".join(f"{s}, {les}, {d}, {f}" for s, les, d, f in cdg["densest"])
        line = (f"| {family} | {seed} | {r['n']} ({r['lesion_scans']}, {r['odd_scans']}) "
                f"| {pct(musc.get('patient_auroc'))} / {pct(cdg.get('patient_auroc'))} "
                f"| {pct(musc.get('dice_lesion'))} / {pct(cdg.get('dice_lesion'))} "
                f"| {cdg['outlier_sizes']} ({pct(cdg['outlier_lesion_share'])}) | {cdg.get('diffuse_sizes', '-')} "
                f"| {cdg['healthy_flagged']} ({100 * cdg['healthy_rise']:.1f}) | {densest} |")
        for name in names:
            v = rows[name]
            line += (f" {pct(v.get('patient_auroc'))}, {pct(v.get('dice_lesion'))}, {v['outlier_sizes']}, "
                     f"{v.get('diffuse_sizes', '-')}, {v['healthy_flagged']} ({100 * v['healthy_rise']:.1f}) |")
        lines.append(line)
    return "\n".join(lines)


def candidate_summary(results: dict) -> str:
    """Dev only: per open choice, the rules study's criterion over every cached row: mean patient
    AUROC over the lesion rows, healthy scans filtered on them, and on the lesion-free rows the
    healthy scans filtered with a scan-score rise above 1 % (criterion 1: none)."""
    lesion = [r["rows"] for r in results.values() if r["lesion_scans"]]
    free = [r["rows"] for r in results.values() if not r["lesion_scans"]]
    lines = [f"| choice | mean patient AUROC, {len(lesion)} lesion rows | healthy filtered, lesion rows "
             f"| lesion-free rows ({len(free)}): healthy filtered with a rise > 1 % |", "|---|---|---|---|"]
    for name in ["MuSc", "MuSc same f"] + [f"CoDeGraph {c}" for c in CANDIDATES]:
        auroc = np.mean([rows[name]["patient_auroc"] for rows in lesion if name in rows])
        healthy = sum(rows[name].get("healthy_flagged", 0) for rows in lesion if name in rows)
        rising = sum(rows[name].get("healthy_flagged", 0) for rows in free
                     if name in rows and rows[name].get("healthy_rise", 0.0) > 0.01)
        lines.append(f"| {name} | {100 * auroc:.2f} | {healthy if name.startswith('CoDeGraph') else '-'} "
                     f"| {rising if name.startswith('CoDeGraph') else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=f"seeds: dev {SPLITS['dev'].seeds}, test {SPLITS['test'].seeds} "
               "(disjoint: a dev seed is never a test seed)")
    parser.add_argument("--out", required=True, help="work folder (cohorts, tokens, <split>/results.json, table.md)")
    parser.add_argument("--split", choices=tuple(SPLITS), required=True)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of the families")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the split's seeds")
    parser.add_argument("--n", type=int, default=60, help="scans per cohort (a third with look-alike lesions)")
    parser.add_argument("--cube", type=int, default=112, help="cube edge in voxels (multiple of 14)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    setting = SPLITS[args.split]
    if set(SPLITS["dev"].seeds) & set(SPLITS["test"].seeds):
        parser.error("the dev and test splits share seeds")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(setting.seeds)
    if not set(seeds) <= set(setting.seeds):
        parser.error(f"split {args.split} has seeds {setting.seeds}, got {seeds}")
    families = args.families.split(",")
    for family in families:
        if family not in FAMILIES:
            parser.error(f"unknown family {family!r}; expected {tuple(FAMILIES)}")
    out = Path(args.out)
    store = out / args.split / f"results-{args.cube}.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text(encoding="utf-8")) if store.is_file() else {}
    for seed in seeds:
        for family in families:
            key = f"{family}:{seed}:{args.n}"
            if key not in results:
                results[key] = run_family(family, args.split, seed, out, args.n, args.cube)
                store.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
                log.warning("%s %s: %s", args.split, key, {k: v.get("patient_auroc") for k, v in results[key]["rows"].items()})
    text = table(args.split, results)
    if args.split == "dev":
        text += "\n\n" + candidate_summary(results)
    (out / args.split / f"table-{args.cube}.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


# --- Small metastases: small-lesion, mixed-size and registration-error families and the
# grid x window table. Same splits and seeds as above (dev 0, test 1-3; the split's contrast), the
# look-alike family at the split's large radii as the large-lesion control; every family tokenised
# at 14- and 7-voxel cubes and scored globally and within windows (`benchmarks/grid_window.py`).

# lesions per lesion scan of the small-lesion families, and their radii (mm, outer edge)
SMALL_LESIONS_PER_SCAN = (1, 5)
SMALL_RADIUS_MM = (1.5, 5.0)
MIXED_RADIUS_MM = (1.5, 20.0)
# largest residual displacement per scan beyond what registration corrects (`PhantomConfig.registration_error_mm`)
REGISTRATION_ERROR_MM = (2.0, 8.0)
FINE_FAMILIES = ("small-lesion", "mixed", "registration-error", "registration-error-mixed", "lookalike")
# (cube edge in voxels, window in cells or None = global search)
GRID_WINDOWS = ((14, None), (14, 1), (7, None), (7, 0), (7, 1), (7, 2), (7, 3))


def fine_family_config(family: str, split: str, seed: int, n: int, cube: int) -> PhantomConfig:
    """The cohort of a small-metastasis family: a third of the scans with 1-5 look-alike lesions
    of radius 1.5-5 mm (`small-lesion`), 1.5-20 mm (`mixed`), small or mixed ones in scans each
    misregistered by 2-8 mm (`registration-error`, `registration-error-mixed`), or the look-alike
    family of the split (`lookalike`)."""
    config = family_config("lookalike", SPLITS[split], seed, n, cube)
    if family == "lookalike":
        return config
    radius = MIXED_RADIUS_MM if family.endswith("mixed") else SMALL_RADIUS_MM
    config = replace(config, lesions=replace(config.lesions, radius_mm=radius), lookalike_lesions=SMALL_LESIONS_PER_SCAN)
    if family.startswith("registration-error"):
        config = replace(config, registration_error_mm=REGISTRATION_ERROR_MM)
    return config


def run_grid_window(family: str, split: str, seed: int, out: Path, n: int, cube: int) -> dict:
    """Patient AUROC and lesion Dice of MuSc and CoDeGraph at every (grid, window) of `GRID_WINDOWS`
    on one family's cohort (tokens cached per grid)."""
    folder = out / f"fine-{family}-n{n}-s{seed}-{split}"
    config = fine_family_config(family, split, seed, n, cube)
    batches = {patch: build_batch(folder, config, "n4", patch) for patch in sorted({p for p, _ in GRID_WINDOWS})}
    rows: dict = {}
    for patch, window in GRID_WINDOWS:
        engine = replace(QUIET, window=window)
        for method in ("musc", "codegraph"):
            row = evaluate(batches[patch], method, ScoringConfig(engine=engine))
            rows[f"{patch}:{'global' if window is None else window}:{method}"] = {
                k: row.get(k) for k in ("patient_auroc", "dice_lesion", "cube_auroc", "seconds", "outlier_sizes")}
    batch = batches[14]
    return {"n": len(batch.ids), "lesion_scans": int(batch.lesion.sum()),
            "lesion_voxels": [int(c.sum()) for c, les in zip(batch.cubes, batch.lesion) if les], "rows": rows}


def grid_window_table(results: dict, method: str) -> str:
    """Markdown: one line per (family, seed, N), patient AUROC / lesion Dice (%) per (grid, window)."""
    names = [f"{p}:{'global' if w is None else w}" for p, w in GRID_WINDOWS]
    head = "| family | seed | N (lesion) | " + " | ".join(
        f"{p}³ {'global' if w is None else f'w={w}'}" for p, w in GRID_WINDOWS) + " |"
    lines = [head, "|---" * (3 + len(names)) + "|"]
    for key in sorted(results, key=lambda k: (FINE_FAMILIES.index(k.split(":")[0]), k)):
        family, seed, _ = key.split(":")
        r = results[key]
        cells = [f"{pct(r['rows'][f'{name}:{method}']['patient_auroc'])} / {pct(r['rows'][f'{name}:{method}']['dice_lesion'])}"
                 for name in names]
        lines.append(f"| {family} | {seed} | {r['n']} ({r['lesion_scans']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
