"""Reference cohorts: `volscan screen NEW/ --reference RUN` scores new scans against a finished run.

A finished screen/score run records what a later reference screen needs in `cohort.npz`
(`save_cohort`, format COHORT_FORMAT): its scans' ids, the token-cache keys and cache folder of
their tokens, CoDeGraph's exclusion mask, and per scoring view each valid element's K smallest
minima of the final pass (`volumetric.engine.reference.kept_count`), from which the reference
scans' scores are updated with the new scans as partners. `open_reference` reads it with the run's report (settings) and
collection scores, all checksum-verified against the run's `volscan-run.json`; the new screen
then takes the reference's Nyúl landmarks (`adapt`), is checked to have the reference's settings
(`check`: kind, method, token settings incl. grid and backbone, preprocessing, template, scoring;
one line naming the first difference, before any preprocessing), and its tokens are scored by
`volumetric.engine.reference.score_against_reference` against the reference's cached tokens
(`score`), which also updates the reference scans' scores as a full screen of reference + new
scans gives them (not with `--independent`: the reference's own scores then). Scores are put on
the reference's scale (`annotate`): each new scan's percentile among the reference scans'
(updated) scores, flagged by the rule of those scores; the reference's folder is never
modified. Why CoDeGraph's exclusions are reused and not recomputed over the union, and why
`--independent` keeps the reference's own scores: docs/screen.md, "Reference cohorts".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.flagging import flag_rule
from pipelines.json_ready import plain
from pipelines.plan import CheckedSettings, ScreenPlan
from pipelines.run_folder import read_run_marker, verify_run
from pipelines.run_layout import COHORT_FILE, ELEMENTS_FILE, REPORT_JSON, RunLayout
from volumetric.errors import InputFileError, VolscanError

# cohort.npz format: 2 adds the kept minima ("minima"); 1 (no "format" key) has none.
COHORT_FORMAT = 2
# Engine fields that change speed or memory, not scores: a reference may be re-scored with others.
COMPUTE_ONLY = ("device", "progress", "block_mb", "memory_mb")
# Scoring fields that only shape CoDeGraph's graph and exclusions (and the subsets' seed, refused
# unless one batch): a reference screen reuses the reference run's exclusions and never builds a
# graph, so they may differ (a run made before one of them existed lacks it in its report).
GRAPH_ONLY = ("graph_radii", "reference_fraction", "eps", "coverage", "link_batch", "stop_fence",
              "resolution_quantile", "iqr_k", "min_spread", "density", "dependency_percentile",
              "max_dependent_share", "graph", "fence", "filtering", "seed")
# Preprocessing fields that may differ: the new scans take the reference's landmarks (`adapt`),
# and the brain-extraction device changes where it runs, not what it extracts.
PREPROCESS_FREE = ("landmarks", "mask_device")


@dataclass(frozen=True)
class ReferenceRequest:
    """`--reference RUN` and `--independent` as given: the run folder and whether each new scan is
    scored against the reference alone (its score then does not depend on the other new scans)."""

    run: Path
    independent: bool = False


def save_cohort(path: Path, ids: list[str], token_files: list[Path], excluded: np.ndarray | None,
                minima: np.ndarray | None) -> None:
    """Write `cohort.npz` (uncompressed: the minima are most of it and barely compress):
    `format`, `ids` (N,), `token_keys` (N,) (the token files' names are their keys),
    `token_cache` (the folder holding them), `excluded` (N, *grid) bool packed, or absent (MuSc),
    `minima` (V, T, K) float32 kept minima (`Scores.kept_minima`), or absent (settings that
    cannot serve as a reference)."""
    caches = {str(Path(f).parent.parent.resolve()) for f in token_files}
    if len(caches) != 1:
        raise VolscanError(f"token files of one run lie in {len(caches)} cache folders")
    arrays: dict[str, Any] = dict(ids=np.asarray(ids), token_keys=np.asarray([Path(f).name.split(".")[0]
                                                                             for f in token_files]),
                                  token_cache=np.asarray(caches.pop()), format=np.asarray(COHORT_FORMAT))
    if excluded is not None:
        arrays.update(excluded=np.packbits(np.asarray(excluded, dtype=bool).ravel()),
                      excluded_shape=np.asarray(excluded.shape, dtype=np.int64))
    if minima is not None:
        arrays.update(minima=np.asarray(minima, dtype=np.float32))
    np.savez(path, **arrays)


@dataclass(frozen=True)
class ReferenceRun:
    """A finished run read back for reference scoring. `ids` (N,); `scores` (N,) its collection
    scores; `token_keys` (N,) in `token_cache`; `excluded` (N, *grid) bool or None; `minima`
    (V, T, K) float32 kept minima (None with `independent`, which does not read them); `report`:
    its report.json as a dictionary; `independent`: the request's option."""

    folder: Path
    ids: list[str]
    scores: np.ndarray
    token_keys: list[str]
    token_cache: Path
    excluded: np.ndarray | None
    minima: np.ndarray | None
    report: dict[str, Any]
    independent: bool
    token_sets: tuple[Any, ...] = ()  # the reference scans' tokens, once `with_tokens` loaded them

    def scale(self, scores: Any) -> np.ndarray:
        """(N,) the reference scans' scores a `--reference` run's `scores` (`score`) are set
        against: updated with the new scans as partners, or (`--independent`) the run's own."""
        return self.scores if scores.reference_scores is None else scores.reference_scores

    def rule(self, scores: Any) -> Any:
        """The flag rule of the reference scans' scores (`scale`) with the reference's --flag-z."""
        return flag_rule(self.scale(scores), float(self.report["summary"]["flag_z"]))

    def adapt(self, checked: CheckedSettings) -> CheckedSettings:
        """`checked` with the reference's Nyúl landmarks: new scans are standardised as the
        reference scans were (3D; the landmarks the reference learned or was given)."""
        landmarks = (self.report.get("preprocess") or {}).get("landmarks")
        if self.report["kind"] != "3d" or not landmarks:
            return checked
        if not Path(landmarks).is_file():
            raise InputFileError(landmarks, f"Nyúl landmarks of the reference run {self.folder} are gone "
                                            "(cache pruned?); re-run the reference screen")
        config = dataclasses.replace(checked.config, preprocess={**dict(checked.config.preprocess), "landmarks": landmarks})
        # Only the preprocessing settings change: they alone are rebuilt (and so checked).
        return dataclasses.replace(checked, config=config, preprocess=config.preprocess_settings())

    def check(self, plan: ScreenPlan, token_settings: dict[str, Any]) -> None:
        """One line naming the first setting that differs from the reference run's (before any
        preprocessing): kind, method, each token setting (`token_settings`, as cached: grid size,
        backbone, weights, layers...), preprocessing, template, each scoring setting (engine
        compute fields excepted)."""
        theirs = self.report
        pairs: list[tuple[str, Any, Any]] = [("kind", theirs["kind"], plan.kind),
                                             ("method", theirs["summary"]["method"], plan.method)]
        pairs += _differences("token setting", (theirs.get("tokens") or {}).get("settings", {}), token_settings, ())
        if plan.kind == "3d":
            pairs += _differences("preprocessing setting", theirs["settings"].get("preprocess", {}),
                                  plain(plan.preprocess), PREPROCESS_FREE)
            pairs.append(("template", _template_digest(theirs["settings"].get("template")),
                          _template_digest(plan.template)))
        pairs += _differences("scoring setting", theirs.get("scoring", {}), plain(plan.scoring),
                              COMPUTE_ONLY + GRAPH_ONLY)
        for name, reference, ours in pairs:
            if reference != ours:
                raise VolscanError(f"--reference {self.folder}: {name} differs (reference {_shown(reference)}, "
                                   f"this run {_shown(ours)}); screen with the reference's settings")
        from volumetric.engine.reference import check_reference_config

        check_reference_config(plan.scoring)  # also with --independent, before any preprocessing
        self.check_new_count(len(plan.subjects), plan.method, plan.scoring)

    def check_new_count(self, new: int, method: str, scoring_config: Any) -> None:
        """One line when `new` scans are more than the kept minima can update the reference's
        scores for (about as many as the reference has scans; not with `independent`)."""
        from volumetric.engine.reference import method_top_fraction, most_new

        if self.minima is None:
            return
        most = most_new(len(self.ids), self.minima.shape[2], method_top_fraction(scoring_config, method))
        if most is not None and new > most:
            raise VolscanError(f"--reference {self.folder}: its kept minima update its scores for at most {most} new "
                               f"scans at once, got {new}; screen them in batches of {most}, or with --independent")

    def tokens(self) -> list[Any]:
        """The reference scans' token sets from its cache (read-only); one line naming what is missing."""
        from pipelines.failures import shown
        from volumetric.token_cache import TokenCache

        cache = TokenCache(self.token_cache)
        sets, missing = [], []
        for sid, key in zip(self.ids, self.token_keys):
            try:
                tokens = cache.load(key, discard=False)
            except InputFileError as exc:
                raise VolscanError(f"--reference {self.folder}: {exc} (tokens of {sid})") from None
            if tokens is None:
                missing.append(sid)
            sets.append(tokens)
        if missing:
            raise VolscanError(f"--reference {self.folder}: tokens of {len(missing)} reference scan(s) are no longer in "
                               f"{cache.root}: {shown(missing)}; re-run the reference (volscan score) to rebuild them")
        return sets

    def with_tokens(self) -> ReferenceRun:
        """This run with its scans' token sets loaded (`tokens`), as `score` needs them."""
        return dataclasses.replace(self, token_sets=tuple(self.tokens()))

    def check_distinct(self, ids: list[str], token_files: list[Path]) -> None:
        """Refuse a new scan whose model input is a reference scan's (same token key): it would
        vouch for itself."""
        ours = {Path(f).name.split(".")[0]: sid for sid, f in zip(ids, token_files)}
        for sid, key in zip(self.ids, self.token_keys):
            if key in ours:
                raise VolscanError(f"new scan {ours[key]} is the same image as reference scan {sid} of "
                                   f"{self.folder}; remove it from the new scans")

    def score(self, token_sets: list[Any], method: str, scoring_config: Any) -> Any:
        """The score stage's `Scores` of the new scans against the reference (classical tokens are
        standardised with the reference scans' statistics, as the reference run was), with the
        reference scans' updated scores (`Scores.reference_scores`) unless `independent`."""
        import torch

        from pipelines.stages.score import Scores
        from volumetric.classical_tokens import needs_batch_standardize, standardize_batch
        from volumetric.engine.reference import score_against_reference

        everyone = list(self.token_sets) + list(token_sets)
        n = len(self.token_sets)
        layers = [torch.stack([t.layers[i] for t in everyone]) for i in range(len(everyone[0].layers))]
        valid = ~torch.stack([t.void for t in everyone])
        if needs_batch_standardize(everyone):
            statistics_from = valid.clone()
            statistics_from[n:] = False
            layers = standardize_batch(layers, statistics_from)
        excluded = None if self.excluded is None or method != "codegraph" else torch.from_numpy(self.excluded)
        minima = None if self.minima is None else [torch.from_numpy(v) for v in self.minima]
        result = score_against_reference([g[n:] for g in layers], [g[:n] for g in layers], valid[n:], valid[:n],
                                         method, scoring_config, excluded=excluded, independent=self.independent,
                                         base_minima=minima)
        updated = None if result.reference_scores is None else result.reference_scores.double().numpy()
        return Scores(element_scores=result.element_scores.numpy().astype(np.float32),
                      collection_scores=result.collection_scores.double().numpy(), settings=plain(scoring_config),
                      reference_scores=updated)

    def annotate(self, report: Any, scores: Any) -> None:
        """Put a finished report of new scans on the reference's scale (`scale(scores)`): each
        scan's percentile among the reference scans' scores, and `report.reference`, the merged
        table both cohorts apart (reference scans with their score in this ranking and in their
        own run)."""
        scale, rule = self.scale(scores), self.rule(scores)
        for entry in report.subjects:
            entry.percentile = round(percentile(scale, entry.score), 1)
        rows = [{"id": e.id, "cohort": "new", "score": e.score, "percentile": e.percentile, "flagged": e.flagged}
                for e in report.subjects]
        rows += [{"id": sid, "cohort": "reference", "score": float(s), "own_run_score": float(own),
                  "percentile": round(percentile(scale, s), 1), "flagged": bool(s > rule.threshold)}
                 for sid, s, own in zip(self.ids, scale, self.scores)]
        rows.sort(key=lambda r: -r["score"])
        report.reference = {
            "run": str(self.folder), "scans": len(self.ids), "independent": self.independent,
            "codegraph_exclusions": "reused from the reference run" if self.excluded is not None else None,
            "reference_scores": ("the reference run's own" if scores.reference_scores is None
                                 else "updated with the new scans as partners (as in a screen of everyone)"),
            "flag_rule": rule.describe(), "scans_by_score": rows,
        }
        report.settings["reference"] = str(self.folder)
        report.settings["independent"] = self.independent


def percentile(scale: np.ndarray, score: float) -> float:
    """Share of `scale`'s scores below `score` (ties count half), in percent."""
    below = float(np.sum(scale < score)) + 0.5 * float(np.sum(scale == score))
    return 100.0 * below / len(scale)


def open_reference(request: ReferenceRequest) -> ReferenceRun:
    """Read and verify the reference run `request.run`; one line naming what is wrong."""
    folder = Path(request.run).expanduser().resolve()
    marker = read_run_marker(folder)
    command = marker["command"] if marker and marker["command"] in ("screen", "score") else "screen"
    verify_run(folder, command, prefixes=(REPORT_JSON, ELEMENTS_FILE, COHORT_FILE))
    layout = RunLayout(folder)
    if not layout.cohort.is_file():
        raise InputFileError(layout.cohort, "missing: the reference must be a screen or score run that "
                             "records its tokens (not itself a --reference run, nor one of an older volscan); "
                             "re-run it with volscan score")
    try:
        report = json.loads(layout.report_json.read_text(encoding="utf-8"))
        with np.load(layout.cohort, allow_pickle=False) as data:
            ids = [str(i) for i in data["ids"]]
            keys = [str(k) for k in data["token_keys"]]
            cache = Path(str(data["token_cache"]))
            excluded = (np.unpackbits(data["excluded"], count=int(np.prod(data["excluded_shape"])))
                        .astype(bool).reshape(tuple(data["excluded_shape"])) if "excluded" in data.files else None)
            version = int(data["format"]) if "format" in data.files else 1
            minima = None if request.independent or "minima" not in data.files else np.asarray(data["minima"])
        with np.load(layout.elements, allow_pickle=False) as data:
            scores = np.asarray(data["collection_scores"], dtype=np.float64)
            element_ids = [str(i) for i in data["ids"]]
    except (OSError, KeyError, ValueError) as exc:
        raise InputFileError(folder, f"not a readable volscan run ({exc})") from None
    if element_ids != ids or len(keys) != len(ids):
        raise InputFileError(layout.cohort, "does not match the run's elements.npz")
    if version > COHORT_FORMAT:
        raise InputFileError(layout.cohort, f"format {version} is newer than this volscan reads ({COHORT_FORMAT}); "
                             "upgrade volscan")
    if minima is None and not request.independent:
        why = ("an older volscan wrote it (format 1)" if version < 2 else
               "its settings cannot serve as a reference (subsets, pre-selection, --window, RsCIN or "
               "CoDeGraph's unflagged_fraction)")
        raise InputFileError(layout.cohort, f"holds no kept minima to update the reference scans' scores with "
                             f"({why}); re-run the reference with volscan score (cached tokens: no re-extraction), "
                             "or screen with --independent (the reference's own scores)")
    return ReferenceRun(folder=folder, ids=ids, scores=scores, token_keys=keys, token_cache=cache,
                        excluded=excluded, minima=minima, report=report, independent=request.independent)


def _differences(what: str, reference: dict[str, Any], ours: dict[str, Any], free: tuple[str, ...],
                 prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(name, reference value, our value) for every key of either table, nested tables flattened."""
    pairs = []
    for key in sorted(set(reference) | set(ours)):
        if key in free:
            continue
        mine, theirs = ours.get(key), reference.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            pairs += _differences(what, theirs, mine, free, f"{prefix}{key}.")
        else:
            pairs.append((f"{what} '{prefix}{key}'", _as_json(theirs), _as_json(mine)))
    return pairs


def _as_json(value: Any) -> Any:
    """`value` as JSON reads it back (tuples as lists), so a setting compares equal to its report."""
    return json.loads(json.dumps(value, default=str))


def _template_digest(template: str | None) -> list[str] | str:
    """Content hashes of a template folder's files (the folder may be spelled or mounted otherwise)."""
    from volumetric.hashing import content_hash
    from preprocessing.template import find_template_folder, template_files

    try:
        return [content_hash(p) for p in template_files(find_template_folder(template))]
    except VolscanError:
        return f"{template} (not found)"


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
