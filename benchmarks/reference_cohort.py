"""Reference cohorts (`volscan screen NEW --reference RUN`) against a full screen of everyone.

One command: generates a phantom cohort (co-registered, skull-stripped procedural heads as in
`volscan demo`; 44 healthy + 16 with look-alike lesions by default), splits it at random (seeded)
into 48 reference + 12 new scans, and for MuSc and CoDeGraph screens (classical tokens, one
shared cache) all 60, the 48 reference scans, and the 12 new ones `--reference` the 48 (with and
without `--independent`). Prints and writes `results.json`:

- ranks: each new scan's rank in the merged ranking (the reference scans' scores as the new run
  reports them: updated with the new scans as partners, or with `--independent` the reference
  run's own, + the new scores) against its rank in the full screen of 60, and its rank among the
  reference scans only (max |difference|); and the merged ranking against a full screen of 60
  preprocessed with the reference run's Nyúl landmarks (as reference mode preprocesses the new
  scans), scored as screened and with its classical tokens standardised with the 48 reference
  scans' statistics (as reference mode standardises them): with both batch-learned steps taken
  from the reference, what remains is the scoring itself;
- patient AUROC of the merged 60 against the full screen's (look-alike scans positive);
- scoring time: the full screen's score stage (`score_tokens` on the 60 token sets) against the
  reference score stage for the 12 (`ReferenceRun.score`), side by side in one process, rounds
  alternating, medians (wall and this process's CPU time);
- independence: each new scan scored alone (`--independent`) against its score among the 12;
- the batch's own effect: the reference scans' ranks among themselves in their own run and in
  the full screen;
- the kept minima: bytes of `cohort.npz`'s `minima` per reference scan, and their cost in the
  full screen's scoring (`score_collections` with and without them, same rounds).

    python benchmarks/reference_cohort.py --out /tmp/reference-bench            # ~20 min on 2 shared cores
    python benchmarks/reference_cohort.py --out /tmp/rb --normal 20 --lookalike 8 --new 6 --repeats 1

`--synthetic`: the scoring time only, at the token shapes of `--size` (224: a 16^3 grid) without
generating or screening a cohort: synthetic classical-like token sets (features from the seed,
`--lookalike` of them with the same planted anomaly, void cells from a real cached cube with
`--void-from` or an ellipsoid), the reference's exclusions and kept minima from its own
`score_tokens`, then the same side-by-side timing as above (`time_side_by_side`):

    python benchmarks/reference_cohort.py --out /tmp/rs --synthetic --size 224 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipelines.demo import DEMO_WARPS
from pipelines.phantom import Cohort, LesionSettings, PhantomConfig, generate_cohort
from pipelines.reference import ReferenceRequest, ReferenceRun, open_reference
from pipelines.screen import run_screen
from pipelines.screen_config import ScreenConfig
from pipelines.stages.score import score_tokens
from volumetric.classical_tokens import BATCH_STANDARDIZE, standardize_batch
from volumetric.engine import score_collections
from volumetric.engine.reference import kept_count, method_top_fraction
from volumetric.errors import VolscanError
from volumetric.metrics import auroc
from volumetric.token_set import TokenSet

# Channels per layer of the classical tokens at the default scales (1, 2, 4) with the reference
# pair standardize_batch appends not yet added: 12 + 16, as the token cache holds them.
CLASSICAL_CHANNELS = (12, 16)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def split_cohort(cohort: Cohort, out: Path, new: int, seed: int) -> dict[str, list[str]]:
    """Copy the images (and labels) into OUT/split/{all,reference,new}; the new scans drawn at random."""
    ids = cohort.subjects
    chosen = set(random.Random(seed).sample(ids, new))
    parts = {"all": ids, "reference": [s for s in ids if s not in chosen], "new": sorted(chosen)}
    for name, members in parts.items():
        folder = out / "split" / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "images").mkdir(parents=True)
        for sid in members:
            shutil.copy(cohort.image(sid), folder / "images" / cohort.image(sid).name)
    return parts


def ranks_of(scores: dict[str, float]) -> dict[str, int]:
    """Rank 1 = highest score."""
    order = sorted(scores, key=lambda s: -scores[s])
    return {sid: i + 1 for i, sid in enumerate(order)}


def run_scores(run: Path) -> dict[str, float]:
    """id -> score of a finished run (report.json)."""
    report = json.loads((run / "report.json").read_text())
    return {s["id"]: float(s["score"]) for s in report["subjects"]}


def merged_scores(run: Path) -> dict[str, float]:
    """id -> score of every scan, new and reference, as a --reference run's report ranks them."""
    report = json.loads((run / "report.json").read_text())
    return {r["id"]: float(r["score"]) for r in report["reference"]["scans_by_score"]}


def reference_statistics_screen(sets: list, reference: int, method: str, scoring) -> np.ndarray:
    """(N,) collection scores of a full screen of `sets` whose classical tokens are standardised
    with the first `reference` sets' statistics (as reference mode standardises them)."""
    layers = [torch.stack([t.layers[i] for t in sets]) for i in range(len(sets[0].layers))]
    valid = ~torch.stack([t.void for t in sets])
    statistics_from = valid.clone()
    statistics_from[reference:] = False
    layers = standardize_batch(layers, statistics_from)
    return score_collections(layers, valid, method=method, config=scoring).collection_scores.double().numpy()


def timed(fn) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_side_by_side(row: dict, full_sets: list, new_sets: list, ref_runs: dict, method: str, scoring,
                      repeats: int, kept_minima_cost: bool) -> None:
    """Time the score stages side by side in this process, rounds alternating, into `row`: the full
    screen's `score_tokens` on `full_sets` against `ReferenceRun.score` of `new_sets` for
    `ref_runs[independent]` (False: updating the reference scores, True: `--independent`);
    `kept_minima_cost`: also `score_collections` on `full_sets` with and without the kept minima."""
    valid = ~torch.stack([t.void for t in full_sets])
    layers = standardize_batch([torch.stack([t.layers[i] for t in full_sets])
                                for i in range(len(full_sets[0].layers))], valid)
    keep = kept_count(len(full_sets), method_top_fraction(scoring, method))  # what score_tokens keeps
    times: dict[str, list[tuple[float, float]]] = {"full": [], "dependent": [], "independent": []}
    if kept_minima_cost:
        times.update(full_no_kept_minima=[], full_kept_minima=[])
    for _ in range(repeats):
        times["full"].append(timed(lambda: score_tokens(full_sets, method, scoring)))
        for ind, key in ((False, "dependent"), (True, "independent")):
            times[key].append(timed(lambda r=ref_runs[ind]: r.score(new_sets, method, scoring)))
        if kept_minima_cost:
            for key, kept in (("full_no_kept_minima", 0), ("full_kept_minima", keep)):
                times[key].append(timed(lambda kept=kept: score_collections(layers, valid, method=method,
                                                                            config=scoring, keep_minima=kept)))
    medians = {k: {"wall_s": statistics.median(t[0] for t in v), "cpu_s": statistics.median(t[1] for t in v)}
               for k, v in times.items()}
    for key in ("dependent", "independent"):
        row.setdefault(key, {})
        row[key]["speedup_wall"] = medians["full"]["wall_s"] / medians[key]["wall_s"]
        row[key]["speedup_cpu"] = medians["full"]["cpu_s"] / medians[key]["cpu_s"]
        row[key]["speedup_per_round_cpu"] = [f[1] / r[1] for f, r in zip(times["full"], times[key])]
    row["timings"] = medians


def brain_void(grid: int, void_from: Path | None) -> torch.Tensor:
    """(g, g, g) bool, True at void cells: a real preprocessed cube's (`void_from`, a token file of a
    cache at that grid), else an ellipsoid filling about 40 % of the grid (a brain's share)."""
    if void_from is not None:
        void = TokenSet.load(void_from).void
        if tuple(void.shape) != (grid,) * 3:
            raise VolscanError(f"{void_from}: token grid {tuple(void.shape)}, expected {(grid,) * 3} (--size)")
        return void
    axes = (torch.arange(grid) - (grid - 1) / 2) / grid
    z, y, x = torch.meshgrid(axes, axes, axes, indexing="ij")
    return (z / 0.48) ** 2 + (y / 0.44) ** 2 + (x / 0.46) ** 2 > 1


def synthetic_token_sets(n: int, void: torch.Tensor, channels: tuple[int, ...], planted: set[int],
                         seed: int) -> list[TokenSet]:
    """`n` classical-like token sets on `void`'s grid, `channels` per layer (features from `seed`):
    a shared "anatomy" field per layer plus per-scan noise of half its scale; the scans in
    `planted` carry the same offset (3 x the anatomy's scale) in the same 3^3 block of brain
    cells, a consistent anomaly for CoDeGraph to find."""
    gen = torch.Generator().manual_seed(seed)
    grid = tuple(void.shape)
    anatomy = [torch.randn(*grid, c, generator=gen) for c in channels]
    offsets = [3 * torch.randn(c, generator=gen) for c in channels]
    brain = (~void).nonzero().float()
    centre = brain[(brain - brain.mean(0) - torch.tensor([0.2 * grid[0], 0.0, 0.0])).norm(dim=1).argmin()].long()
    block = torch.zeros(grid, dtype=torch.bool)
    block[tuple(slice(max(int(c) - 1, 0), int(c) + 2) for c in centre)] = True
    block &= ~void
    sets = []
    for i in range(n):
        layers = [a + 0.5 * torch.randn(a.shape, generator=gen) for a in anatomy]
        if i in planted:
            for layer, offset in zip(layers, offsets):
                layer[block] += offset
        sets.append(TokenSet(layers, void.clone(), grid, {BATCH_STANDARDIZE: True, "synthetic": True}))
    return sets


def synthetic_main(args: argparse.Namespace, results: dict) -> None:
    """The score stages side by side on synthetic token sets of the real shapes at `args.size`
    (no cohort, no screens): the reference run's score stage (`score_tokens` on the reference
    scans: its exclusions and kept minima) feeds `ReferenceRun.score`, timed against the full
    screen's `score_tokens` of everyone (`time_side_by_side`)."""
    grid = args.size // 14
    void = brain_void(grid, args.void_from)
    n = args.normal + args.lookalike
    ids = [f"syn-{i:03d}" for i in range(n)]
    planted = set(random.Random(args.seed + 1).sample(range(n), args.lookalike))
    by_id = dict(zip(ids, synthetic_token_sets(n, void, CLASSICAL_CHANNELS, planted, args.seed)))
    new = sorted(random.Random(args.seed).sample(ids, args.new))  # drawn as split_cohort draws them
    reference_ids = [s for s in ids if s not in new]
    results["synthetic"] = {"grid": grid, "brain_tokens_per_scan": int((~void).sum()), "channels": CLASSICAL_CHANNELS,
                            "void_from": str(args.void_from) if args.void_from else "ellipsoid",
                            "planted": sorted(ids[i] for i in planted), "new": new}
    for method in args.methods:
        scoring = ScreenConfig(backbone="classical", size=args.size, method=method, device="cpu",
                               scoring={"engine": {"progress": False}}).scoring_config("cpu", "3d")
        reference_sets = [by_id[s] for s in reference_ids]
        own = score_tokens(reference_sets, method, scoring)  # what the reference run's cohort.npz keeps
        ref_runs = {ind: ReferenceRun(folder=Path("synthetic"), ids=reference_ids, scores=own.collection_scores,
                                      token_keys=[], token_cache=Path("."), excluded=own.excluded,
                                      minima=None if ind else own.kept_minima, report={}, independent=ind,
                                      token_sets=tuple(reference_sets)) for ind in (False, True)}
        row: dict = {}
        if own.excluded is not None:
            touched = [sid for sid, e in zip(reference_ids, own.excluded) if e.any()]
            row["reference_exclusions"] = {"fraction": own.excluded_fraction, "scans": len(touched),
                                           "planted_scans": sum(ids.index(s) in planted for s in touched)}
        time_side_by_side(row, list(by_id.values()), [by_id[s] for s in new], ref_runs, method, scoring,
                          args.repeats, kept_minima_cost=False)
        results["methods"][method] = row
        print(json.dumps({method: row}, indent=1), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--normal", type=int, default=44)
    parser.add_argument("--lookalike", type=int, default=16)
    parser.add_argument("--new", type=int, default=12)
    parser.add_argument("--contrast", type=float, default=1.5, help="lesion contrast (the demo's 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (the split uses it too)")
    parser.add_argument("--size", type=int, default=112, help="cube edge of the screen (grid size / 14)")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds")
    parser.add_argument("--methods", nargs="+", default=["musc", "codegraph"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the timed scoring (default torch's; 1 on a shared, loaded machine)")
    parser.add_argument("--synthetic", action="store_true",
                        help="time the score stages only, on synthetic token sets of the real shapes at --size")
    parser.add_argument("--void-from", type=Path, default=None,
                        help="--synthetic: a token file (cache entry at --size) whose void cells all scans take")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        results = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "methods": {}}
        synthetic_main(args, results)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"CPU: {results['cpu']}; results: {out / 'results.json'}")
        return

    phantom = PhantomConfig(n_normal=args.normal, n_lesion=0, n_consistent=0, n_lookalike=args.lookalike,
                            lookalike_lesions=(1, 3), seed=args.seed, size=64, template="procedural",
                            skull_stripped=True, warps=DEMO_WARPS,
                            lesions=LesionSettings(radius_mm=(12.0, 20.0), contrast=args.contrast))
    cohort_dir = out / "cohort"
    cohort = Cohort.load(cohort_dir) if (cohort_dir / "cohort.json").is_file() else generate_cohort(
        cohort_dir, phantom, progress=False)
    parts = split_cohort(cohort, out, args.new, args.seed)
    positive = {sid: cohort.groups[sid] != "normal" for sid in cohort.subjects}
    base = ScreenConfig(backbone="classical", size=args.size, registered=True, skull_stripped=True,
                        template=str(cohort.template_dir), cache=str(out / "cache"), viewer_scans=0, device="cpu")
    results: dict = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "cohort": {"normal": args.normal, "lookalike": args.lookalike,
                                                     "contrast": args.contrast, "seed": args.seed, "size": args.size,
                                                     "new": parts["new"]}, "methods": {}}
    for method in args.methods:
        config = replace(base, method=method)
        runs = out / "runs" / method
        full = run_screen(out / "split/all/images", runs / "full", config, force=True).out_dir
        reference = run_screen(out / "split/reference/images", runs / "reference", config, force=True).out_dir
        new = {}
        for independent in (False, True):
            name = "new-independent" if independent else "new"
            new[independent] = run_screen(out / "split/new/images", runs / name, config, force=True,
                                          reference=ReferenceRequest(reference, independent)).out_dir
        full_scores, reference_scores = run_scores(full), run_scores(reference)
        full_ranks = ranks_of(full_scores)
        row: dict = {"full_auroc": auroc(np.array([full_scores[s] for s in cohort.subjects]),
                                         np.array([positive[s] for s in cohort.subjects]))}
        # How much the batch alone moves ranks: the reference scans among themselves, screened as
        # 48 (their own run) and inside the 60 (the full screen).
        own, inside = ranks_of(reference_scores), ranks_of({s: full_scores[s] for s in reference_scores})
        changes = [abs(own[s] - inside[s]) for s in reference_scores]
        row["reference_scans_rank_change"] = {"max": max(changes), "within_2": sum(c <= 2 for c in changes),
                                              "of": len(changes)}
        # Full screens with what reference mode takes from the reference: its Nyúl landmarks, and
        # (scored here) its standardisation statistics.
        landmarks = json.loads((reference / "report.json").read_text())["preprocess"]["landmarks"]
        aligned = run_screen(out / "split/all/images", runs / "full-reference-landmarks",
                             replace(config, preprocess={"landmarks": landmarks}), force=True).out_dir
        aligned_scores = run_scores(aligned)
        aligned_ranks = ranks_of(aligned_scores)
        scoring = replace(config, scoring={"engine": {"progress": False}}).scoring_config("cpu", "3d")
        aligned_run = open_reference(ReferenceRequest(aligned))
        aligned_sets = dict(zip(aligned_run.ids, aligned_run.tokens()))
        order = [s for s in aligned_run.ids if s in reference_scores] + parts["new"]
        same_statistics = dict(zip(order, reference_statistics_screen([aligned_sets[s] for s in order],
                                                                      len(reference_scores), method, scoring)))
        same_statistics_ranks = ranks_of(same_statistics)
        everyone = open_reference(ReferenceRequest(full))
        sets = dict(zip(everyone.ids, everyone.tokens()))
        for independent, folder in new.items():
            merged = merged_scores(folder)
            merged_ranks = ranks_of(merged)
            key = "independent" if independent else "dependent"
            new_scores = run_scores(folder)
            # rank among the reference scans only (1..N+1), as the new run ranks them / in the full screen
            among = {s: (1 + sum(merged[r] > new_scores[s] for r in reference_scores),
                         1 + sum(full_scores[r] > full_scores[s] for r in reference_scores)) for s in parts["new"]}
            row[key] = {
                "max_rank_difference": max(abs(merged_ranks[s] - full_ranks[s]) for s in parts["new"]),
                "within_2": sum(abs(merged_ranks[s] - full_ranks[s]) <= 2 for s in parts["new"]),
                "ranks": {s: [merged_ranks[s], full_ranks[s]] for s in parts["new"]},
                "max_rank_difference_all_60": max(abs(merged_ranks[s] - full_ranks[s]) for s in cohort.subjects),
                "max_rank_difference_reference_landmarks": max(abs(merged_ranks[s] - aligned_ranks[s])
                                                               for s in cohort.subjects),
                "max_rank_difference_reference_statistics": max(abs(merged_ranks[s] - same_statistics_ranks[s])
                                                                for s in cohort.subjects),
                "max_abs_score_difference_reference_statistics": max(abs(merged[s] - same_statistics[s])
                                                                     for s in cohort.subjects),
                "max_rank_difference_among_reference": max(abs(a - b) for a, b in among.values()),
                "ranks_among_reference": among,
                "merged_auroc": auroc(np.array([merged[s] for s in cohort.subjects]),
                                      np.array([positive[s] for s in cohort.subjects])),
            }

        row["reference_landmarks_auroc"] = auroc(np.array([aligned_scores[s] for s in cohort.subjects]),
                                                 np.array([positive[s] for s in cohort.subjects]))
        row["same_statistics_auroc"] = auroc(np.array([same_statistics[s] for s in cohort.subjects]),
                                             np.array([positive[s] for s in cohort.subjects]))
        with np.load(reference / "cohort.npz") as data:
            row["kept_minima"] = {"shape": list(data["minima"].shape),
                                  "mb_per_reference_scan": data["minima"].nbytes / 2**20 / len(reference_scores)}

        # Side by side in this process: the score stage of the full screen and of the reference screen.
        ref_runs = {ind: open_reference(ReferenceRequest(reference, ind)).with_tokens() for ind in (False, True)}
        new_sets = [sets[s] for s in parts["new"]]
        full_sets = [sets[s] for s in everyone.ids]
        time_side_by_side(row, full_sets, new_sets, ref_runs, method, scoring, args.repeats, kept_minima_cost=True)

        # Independence: each new scan alone against the reference vs among the others.
        together = ref_runs[True].score(new_sets, method, scoring).collection_scores
        alone = [float(ref_runs[True].score([t], method, scoring).collection_scores[0]) for t in new_sets]
        row["independent"]["max_abs_alone_vs_together"] = float(np.max(np.abs(np.asarray(alone) - together)))
        dependent = ref_runs[False].score(new_sets, method, scoring).collection_scores
        row["dependent"]["max_abs_alone_vs_together"] = float(np.max(np.abs(np.asarray(alone) - dependent)))
        results["methods"][method] = row
        print(json.dumps({method: row}, indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"CPU: {results['cpu']}; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
