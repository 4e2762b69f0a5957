"""2D detection benchmark: MuSc vs MuSc + RsCIN vs CoDeGraph (+ RsCIN) on texture cohorts.

Family: `pipelines.phantom.textures` (noise / grating / cells categories, 30 normal + 10 defect
images of 112 x 112 each, scratches, spots and colour shifts, a variant normal mode). Splits:
`dev` = seeds 0, 1, 2 (where the RsCIN default is chosen), `test` = seeds 100 .. 104 (reported
with the default frozen). Features: the weights-free classical tokens (`--backbone classical`;
a random ViT would measure nothing, and no pretrained weights are at hand offline), scored by
the screen's own stage (`pipelines.stages.score.score_tokens`: batch standardisation, LNAMD,
mutual scoring / CoDeGraph) at the engine's defaults, once per method; the RsCIN rows re-score
those collection scores in RsCIN's mobile form, `rscin(scores, descriptors, windows)` over the
descriptors `score_collections` uses (L2-normalised per-layer mean of the standardised tokens),
which equals `ScoringConfig(rscin=windows)` (tests/test_engine_rscin.py). Metrics by
`pipelines.evaluate.image_metrics` (the screen's 2D protocol): image AUROC per cohort (RsCIN
only changes image scores); pixel AUROC and AUPRO (MVTec) per method for context.

    nice -n 10 python benchmarks/detection_2d.py --split dev
    nice -n 10 python benchmarks/detection_2d.py --split test
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from pipelines.evaluate import RunElements, image_metrics
from pipelines.phantom.textures import TEXTURE_KINDS, TextureSettings, texture_cohort
from pipelines.stages.score import score_tokens
from volumetric.classical_tokens import ClassicalTokenizer, standardize_batch
from volumetric.engine import EngineOptions, ScoringConfig
from volumetric.engine.partners import global_features
from volumetric.engine.rscin import MVTEC_WINDOWS, VISA_WINDOWS, rscin
from volumetric.metrics import auroc

SPLITS = {"dev": (0, 1, 2), "test": (100, 101, 102, 103, 104)}
WINDOWS = {"off": None, "[1,2,3]": MVTEC_WINDOWS, "[1,8,9]": VISA_WINDOWS}
QUIET = EngineOptions(device="cpu", progress=False)


def descriptors(token_sets: list) -> torch.Tensor:
    """(N, D) the global descriptors `score_collections` gives RsCIN for these token sets."""
    n = len(token_sets)
    layers = [torch.stack([t.layers[i] for t in token_sets]) for i in range(len(token_sets[0].layers))]
    valid = ~torch.stack([t.void for t in token_sets])
    layers = standardize_batch(layers, valid)
    flat = [layer.reshape(n, -1, layer.shape[-1]) for layer in layers]
    return torch.nn.functional.normalize(global_features(flat, valid.reshape(n, -1)), dim=1)


def run_cohort(kind: str, seed: int, windows: dict[str, tuple[int, ...] | None]) -> dict[str, dict[str, float]]:
    """Metrics per row ("musc off", "codegraph [1,2,3]", ...) of one cohort."""
    settings = TextureSettings(kind=kind, seed=seed)
    cohort = texture_cohort(settings)
    tokenizer = ClassicalTokenizer()
    token_sets = [tokenizer(image) for image in cohort.images]
    features = descriptors(token_sets)
    labels = cohort.labels
    rows = {}
    for method in ("musc", "codegraph"):
        scores = score_tokens(token_sets, method, ScoringConfig(engine=QUIET))
        elements = RunElements(ids=cohort.ids, element_scores=scores.element_scores,
                               collection_scores=scores.collection_scores, size=settings.size, kind="2d",
                               brain_masks=None)
        summary, _ = image_metrics(elements, list(cohort.masks))
        for name, window in windows.items():
            image_scores = scores.collection_scores if window is None else rscin(
                torch.as_tensor(scores.collection_scores), features, window).double().numpy()
            rows[f"{method} {name}"] = {"image_auroc": auroc(image_scores, labels),
                                        "pixel_auroc": summary["pixel_auroc"], "aupro": summary["aupro"]}
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the split's table: mean image AUROC per texture kind and overall, per row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=tuple(SPLITS), required=True)
    parser.add_argument("--windows", nargs="+", choices=tuple(WINDOWS), default=list(WINDOWS),
                        help="RsCIN rows (default all)")
    args = parser.parse_args(argv)
    windows = {name: WINDOWS[name] for name in args.windows}
    results: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    start = time.perf_counter()
    for kind in TEXTURE_KINDS:
        for seed in SPLITS[args.split]:
            for row, values in run_cohort(kind, seed, windows).items():
                results[row][kind].append(values)
                print(f"{kind} seed {seed} {row}: image AUROC {values['image_auroc']:.4f}", file=sys.stderr)
    seeds = SPLITS[args.split]
    print(f"split {args.split} (seeds {', '.join(map(str, seeds))}), {len(TEXTURE_KINDS)} kinds x {len(seeds)} "
          f"cohorts of 40 images; {time.perf_counter() - start:.0f} s")
    print("| method | RsCIN | " + " | ".join(f"image AUROC {k}" for k in TEXTURE_KINDS)
          + " | image AUROC mean | pixel AUROC mean | AUPRO mean |")
    print("|---|---|" + "---|" * (len(TEXTURE_KINDS) + 3))
    for row, per_kind in results.items():
        method, window = row.split(" ", 1)
        cells = [np.mean([v["image_auroc"] for v in per_kind[k]]) for k in TEXTURE_KINDS]
        every = [v for k in TEXTURE_KINDS for v in per_kind[k]]
        means = [np.mean([v[key] for v in every]) for key in ("image_auroc", "pixel_auroc", "aupro")]
        print(f"| {method} | {window} | " + " | ".join(f"{c:.4f}" for c in cells + means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
