"""`volscan screen`: a folder of scans in, a ranked list, native-space maps and a report out.

Stages (each timed into report.json, each with a progress bar where it can take a while):

1. inputs: `discover_subjects` (or an explicit `Subject` list from `volscan reproduce`),
   headers and mask grids checked before any heavy work; OUT checked (exists without
   `--force`, unwritable parent) before anything else.
2. preprocess: 3D through `preprocessing.pipeline.preprocess_cohort` into the cache
   (`<cache>/preprocess/<cohort digest>`, resumable, one set of Nyúl landmarks for the whole
   cohort; per-subject `registered` / `skull_stripped`); 2D: read and resize to `size`^2.
3. tokens: `VolumeTokenizer` / `ImageTokenizer` through `TokenCache` (`<cache>/tokens`),
   keyed by the content hash of the preprocessed cube (and brain mask) plus every token
   setting, so a re-run with the same settings extracts nothing.
4. scoring: `volumetric.engine.score_collections` on the whole batch (2D and 3D alike).
5. maps: token scores upsampled to the cube (void -> 0), then `NativeMapping.to_native` onto
   each input's own grid, saved with the input's affine and qform/sform codes (float32).
   2D: float TIFF + heat-map PNG + overlay PNG at the image's own size.
6. metrics (when masks are given): `pipelines.evaluate`.
7. report: scores.csv, report.json, report.html, figures/*.png.

Everything is written into a hidden temporary sibling of OUT and renamed into place at the
end (`AtomicOutputDir`), so a failure never leaves a half-written run. The default cache root
is `preprocessing.template.cache_dir()` (`$VOLSCAN_CACHE_DIR` or `~/.cache/volscan`), outside
OUT, so `--force` re-runs keep their cached tokens.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.evaluate import (
    ELEMENTS_FILE,
    FIGURES_DIR,
    MAPPINGS_DIR,
    MAPS_DIR,
    RunElements,
    attach_metrics,
    label_cube_loader,
    pack_mask,
    score_figures,
)
from pipelines.figures import community_figure, montage_figure
from pipelines.images2d import load_image, resize, write_float_map, write_map_pictures
from pipelines.inputs import Subject, discover_subjects, validate_subjects
from pipelines.maps import save_map_like, score_range, upsample_scores
from pipelines.outputs import AtomicOutputDir, check_output_dir
from pipelines.report import (
    RANDOM_WEIGHTS_WARNING,
    REPORT_HTML,
    ScoreRow,
    rank_scores,
    report_rows,
    write_run_tables,
)
from pipelines.screen_config import ScreenConfig
from volumetric.backbones import check_backbone_name, weights_file
from volumetric.devices import resolve_device
from volumetric.errors import VolscanError

log = logging.getLogger(__name__)


@dataclass
class ScreenResult:
    """A finished run: `out_dir`, ranked `rows` (rank 1 first), the `report` dictionary."""

    out_dir: Path
    rows: list[ScoreRow]
    report: dict[str, Any]

    @property
    def report_html(self) -> Path:
        """Path of the HTML report."""
        return self.out_dir / REPORT_HTML

    @property
    def metrics(self) -> dict[str, Any] | None:
        """Metrics against the masks, or None without labels."""
        return self.report.get("metrics")


@dataclass
class _Prepared:
    """Per-subject model inputs after stage 2 (arrays are loaded lazily, one at a time)."""

    load: list[Callable[[], tuple[np.ndarray, np.ndarray | None]]]  # -> (cube or image, brain mask)
    mappings: list[Any] = field(default_factory=list)  # NativeMapping per subject (3D)
    info: dict[str, Any] = field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def default_cache_root() -> Path:
    """Cache root shared with preprocessing (`$VOLSCAN_CACHE_DIR` or `~/.cache/volscan`)."""
    from preprocessing.template import cache_dir

    return cache_dir()


def run_screen(
    input_dir: str | Path,
    out_dir: str | Path,
    config: ScreenConfig | None = None,
    *,
    labels_dir: str | Path | None = None,
    force: bool = False,
) -> ScreenResult:
    """Screen every NIfTI volume (or 2D image) in `input_dir`; write the run into `out_dir`.

    `labels_dir`: masks with the inputs' file names (absent or empty = healthy).
    """
    config = config or ScreenConfig()
    protected = (Path(input_dir),) + ((Path(labels_dir),) if labels_dir is not None else ())
    check_output_dir(out_dir, force, protected)  # refuse a bad OUT before reading any input
    subjects, _ = discover_subjects(
        input_dir, labels_dir, registered=config.registered, skull_stripped=config.skull_stripped
    )
    return screen_subjects(subjects, out_dir, config, force=force, source=str(input_dir), labels_given=labels_dir is not None)


def screen_subjects(
    subjects: Sequence[Subject],
    out_dir: str | Path,
    config: ScreenConfig,
    *,
    force: bool = False,
    source: str = "subject list",
    labels_given: bool | None = None,
) -> ScreenResult:
    """Screen an explicit subject list (per-subject flags, e.g. BraTS registered + IXI raw).

    Metrics are computed when `labels_given` (default: when any subject has a mask); subjects
    without a mask then count as healthy.
    """
    timer = _Timer()
    subjects = list(subjects)
    protected = tuple({s.image.parent for s in subjects} | {s.label.parent for s in subjects if s.label})
    output = AtomicOutputDir(out_dir, force, protected)
    with timer.stage("inputs"):
        kind = validate_subjects(subjects)
        # Every setting is checked here, before minutes of preprocessing and token extraction.
        check_backbone_name(config.backbone)
        if config.weights not in (None, "random"):
            weights_file(config.weights)
        device = str(resolve_device(config.device))
        preprocess_kwargs = _preprocess_kwargs(config, kind)
        tokenizer_kwargs = _tokenizer_kwargs(config, kind)
        scoring_config = _scoring_config(config, device)
    if labels_given is None:
        labels_given = any(s.label is not None for s in subjects)
    cache_root = Path(config.cache).expanduser() if config.cache else default_cache_root()
    with output as work:
        with timer.stage("preprocess"):
            prepared = _preprocess(subjects, kind, config, cache_root, preprocess_kwargs)
        with timer.stage("tokens"):
            token_sets, brain_masks, token_info = _tokens(
                [s.id for s in subjects], kind, prepared, config, device, cache_root, tokenizer_kwargs
            )
        with timer.stage("scoring"):
            scoring = _score(token_sets, config.method, scoring_config)
        del token_sets
        elements = RunElements(
            ids=[s.id for s in subjects],
            element_scores=scoring.pop("element_scores"),
            collection_scores=scoring.pop("collection_scores"),
            size=config.size,
            kind=kind,
            brain_masks=brain_masks,
        )
        elements.save(work / ELEMENTS_FILE)
        with timer.stage("maps"):
            map_paths = _write_maps(work, subjects, elements, prepared)
        report = _base_report(subjects, kind, config, source, device, cache_root, prepared, token_info, scoring)
        report["subjects"] = _subject_entries(subjects, elements, map_paths)
        if labels_given:
            with timer.stage("metrics"):
                attach_metrics(work, report, elements, [s.label for s in subjects], config.histogram_bins)
        with timer.stage("figures"):
            if not labels_given:
                score_figures(work, report, elements.collection_scores, None)
            _montages(work, report, subjects, elements, prepared, config.top)
            if scoring.get("graph") is not None:
                community_figure(
                    scoring["graph"], scoring["communities"], scoring["outlier_communities"],
                    elements.ids, work / FIGURES_DIR / "communities.png", seed=config.seed,
                )
                report["figures"]["community graph"] = f"{FIGURES_DIR}/communities.png"
        report["timings_s"] = timer.seconds
        write_run_tables(work, report)
    return ScreenResult(output.out, report_rows(report), report)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _checked_kwargs(kwargs: dict[str, Any], target: Callable[..., Any], fixed: set[str], table: str) -> dict[str, Any]:
    """Refuse keys of a config table that `target` does not accept (or that volscan sets itself)."""
    accepted = set(inspect.signature(target).parameters) - fixed
    for key in kwargs:
        if key not in accepted:
            raise VolscanError(
                f"config '{table}': unknown setting '{key}' (accepted: {', '.join(sorted(accepted)) or 'none'})"
            )
    return dict(kwargs)


def _preprocess_kwargs(config: ScreenConfig, kind: str) -> dict[str, Any]:
    """Extra `preprocess_cohort` arguments from the config's `preprocess` table, checked."""
    if kind == "2d":
        if config.preprocess:
            raise VolscanError("config 'preprocess' settings apply to 3D volumes only; remove them for 2D images")
        return {}
    from preprocessing.pipeline import preprocess_cohort
    from preprocessing.registration import RegistrationSettings

    fixed = {"paths", "out_dir", "template", "size", "registered", "skull_stripped", "force", "stale", "progress"}
    kwargs = _checked_kwargs(config.preprocess, preprocess_cohort, fixed, "preprocess")
    if "cutoff" in kwargs:
        kwargs["cutoff"] = tuple(kwargs["cutoff"])
    if isinstance(kwargs.get("registration"), dict):
        try:
            kwargs["registration"] = RegistrationSettings(**kwargs["registration"])
        except TypeError as exc:
            raise VolscanError(f"config 'preprocess.registration': {exc}") from None
    return kwargs


def _tokenizer_kwargs(config: ScreenConfig, kind: str) -> dict[str, Any]:
    """Tokenizer arguments from the flags and the config's `tokenizer` table, checked."""
    from volumetric.tokens import ImageTokenizer, VolumeTokenizer

    tokenizer_cls = VolumeTokenizer if kind == "3d" else ImageTokenizer
    fixed = {"backbone", "layers", "proj_dim", "seed", "device"}
    kwargs = _checked_kwargs(config.tokenizer, tokenizer_cls, fixed, "tokenizer")
    if config.layers is not None:
        kwargs["layers"] = list(config.layers)
    if config.proj_dim is not None:
        kwargs["proj_dim"] = config.proj_dim
    return kwargs


def _scoring_config(config: ScreenConfig, device: str) -> Any:
    """`volumetric.engine.ScoringConfig` from the config's `scoring` table (nested `codegraph`
    table -> `CoDeGraph`); the engine runs on the screen's device unless the table says otherwise."""
    from volumetric.engine import CoDeGraph, ScoringConfig

    settings = dict(config.scoring)
    settings.setdefault("device", device)
    try:
        if isinstance(settings.get("codegraph"), dict):
            settings["codegraph"] = CoDeGraph(**settings["codegraph"])
        if isinstance(settings.get("lnamd_radii"), list):
            settings["lnamd_radii"] = tuple(settings["lnamd_radii"])
        return ScoringConfig(**settings)
    except TypeError as exc:
        raise VolscanError(f"config 'scoring': {exc}") from None


def _preprocess(
    subjects: list[Subject], kind: str, config: ScreenConfig, cache_root: Path, kwargs: dict[str, Any]
) -> _Prepared:
    size = config.size
    if kind == "2d":

        def image_loader(path: Path) -> Callable[[], tuple[np.ndarray, None]]:
            return lambda: (resize(load_image(path), (size, size)), None)

        for subject in subjects:  # fail on a corrupt image now, not after the model loaded
            load_image(subject.image)
        return _Prepared(load=[image_loader(s.image) for s in subjects], info={"resized_to": [size, size]})

    from preprocessing.pipeline import SubjectSpec, preprocess_cohort

    specs = [SubjectSpec(s.image, s.registered, s.skull_stripped, s.id) for s in subjects]
    # One cache folder per cohort (its files) and spatial settings: other cohorts never evict it.
    cohort = _digest({"inputs": sorted(str(s.image.resolve()) for s in subjects), "size": size, "template": config.template})
    folder = cache_root / "preprocess" / cohort
    result = preprocess_cohort(
        specs, folder, template=config.template, size=size, registered=config.registered,
        skull_stripped=config.skull_stripped, stale="recompute", **kwargs,
    )
    loads = [lambda r=record: (r.load_image(), r.load_mask()) for record in result.records]
    return _Prepared(
        load=loads,
        mappings=[record.load_mapping() for record in result.records],
        info={"cache": str(folder), "preprocessed_now": len(result.computed), "landmarks": str(result.landmarks_path)},
    )


def _tokens(
    ids: list[str],
    kind: str,
    prepared: _Prepared,
    config: ScreenConfig,
    device: str,
    cache_root: Path,
    kwargs: dict[str, Any],
) -> tuple[list[Any], np.ndarray | None, dict[str, Any]]:
    """Token sets (cached or extracted), packed brain masks (3D; (N, S^3/8) uint8) and facts."""
    from volumetric.backbones import create_backbone
    from volumetric.token_cache import TokenCache, content_hash
    from volumetric.tokens import ImageTokenizer, VolumeTokenizer

    tokenizer_cls = VolumeTokenizer if kind == "3d" else ImageTokenizer
    backbone = create_backbone(
        config.backbone, config.weights, device, random_seed=config.seed, **config.backbone_kwargs
    )
    tokenizer = tokenizer_cls(backbone, seed=config.seed, device=device, **kwargs)
    cache = TokenCache(cache_root / "tokens")
    settings = dict(tokenizer.settings, size=config.size)
    token_sets, packed_masks, computed = [], [], 0
    for load in tqdm(prepared.load, desc="tokens", unit="vol" if kind == "3d" else "img"):
        array, brain_mask = load()
        source = content_hash(array)
        if brain_mask is not None:
            source += content_hash(brain_mask)
            packed_masks.append(pack_mask(brain_mask))
        key = cache.key(hashlib.sha256(source.encode()).hexdigest(), settings)
        tokens = cache.load(key)
        if tokens is None:
            tokens = tokenizer(array, brain_mask) if kind == "3d" else tokenizer(array)
            cache.store(key, tokens)
            computed += 1
        token_sets.append(tokens)
    grids = {tuple(t.grid) for t in token_sets}
    if len(grids) != 1:
        raise VolscanError(f"token grids differ between inputs: {sorted(grids)}")
    empty = [sid for sid, t in zip(ids, token_sets) if bool(t.void.all())]
    if empty:
        raise VolscanError(
            f"{len(empty)} input(s) have no usable token (e.g. {empty[0]}): every token of the "
            f"{'x'.join(map(str, token_sets[0].grid))} grid is less than {tokenizer.void_fraction:.0%} brain; "
            "use a larger --size or a lower tokenizer void_fraction in the config file"
        )
    info = {
        "settings": settings,
        "computed": computed,
        "cached": len(token_sets) - computed,
        "cache": str(cache.root),
        "grid": list(grids.pop()),
        "random_weights": bool(tokenizer.identity.random_weights),
    }
    log.info("tokens: %d computed, %d from cache", computed, info["cached"])
    return token_sets, np.stack(packed_masks) if packed_masks else None, info


def _score(token_sets: list[Any], method: str, scoring_config: Any) -> dict[str, Any]:
    from volumetric.engine import score_collections

    layers = [torch.stack([t.layers[i] for t in token_sets]) for i in range(len(token_sets[0].layers))]
    valid = ~torch.stack([t.void for t in token_sets])
    result = score_collections(layers, valid, method=method, config=scoring_config)
    out: dict[str, Any] = {
        "element_scores": np.asarray(torch.as_tensor(result.element_scores).float().cpu(), dtype=np.float32),
        "collection_scores": np.asarray(torch.as_tensor(result.collection_scores).double().cpu()),
        "scoring_config": _plain(scoring_config),
        "graph": None,
    }
    graph = result.codegraph
    if graph is not None:
        out.update(
            graph=graph.graph,
            communities=[list(map(int, c)) for c in graph.communities],
            outlier_communities=[int(c) for c in graph.outlier_communities],
            excluded_fraction=graph.excluded_fraction,
            codegraph_summary=graph.summary(),
        )
    return out


def _plain(obj: Any) -> Any:
    """JSON-ready copy of a dataclass config (other objects as their repr)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {name: _plain(getattr(obj, name)) for name in obj.__dataclass_fields__}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _write_maps(work: Path, subjects: list[Subject], elements: RunElements, prepared: _Prepared) -> dict[str, list[str]]:
    maps_dir = work / MAPS_DIR
    maps_dir.mkdir()
    paths: dict[str, list[str]] = {}
    if elements.kind == "3d":
        (work / MAPPINGS_DIR).mkdir()
    low, high = score_range(elements.element_scores)
    for i, subject in enumerate(tqdm(subjects, desc="maps", unit="map")):
        square = upsample_scores(elements.element_scores[i], elements.size)
        if elements.kind == "3d":
            mapping = prepared.mappings[i]
            save_map_like(mapping.to_native(square, order=1), subject.image, maps_dir / f"{subject.id}.nii.gz")
            mapping.save(work / MAPPINGS_DIR / f"{subject.id}.json")
            paths[subject.id] = [f"{MAPS_DIR}/{subject.id}.nii.gz"]
        else:
            image = load_image(subject.image)
            native = resize(square, image.shape[:2])
            names = [f"{subject.id}.tiff", f"{subject.id}_heat.png", f"{subject.id}_overlay.png"]
            write_float_map(native, maps_dir / names[0])
            write_map_pictures(image, native, maps_dir / names[1], maps_dir / names[2], low, high)
            paths[subject.id] = [f"{MAPS_DIR}/{name}" for name in names]
    return paths


def _subject_entries(subjects: list[Subject], elements: RunElements, map_paths: dict[str, list[str]]) -> list[dict[str, Any]]:
    rows = rank_scores(elements.ids, elements.collection_scores)
    by_id = {s.id: s for s in subjects}
    return [
        {
            "id": row.id,
            "rank": row.rank,
            "score": row.score,
            "image": str(by_id[row.id].image),
            "map": map_paths[row.id][0],
            "map_files": map_paths[row.id],
        }
        for row in rows
    ]


def _base_report(
    subjects: list[Subject],
    kind: str,
    config: ScreenConfig,
    source: str,
    device: str,
    cache_root: Path,
    prepared: _Prepared,
    token_info: dict[str, Any],
    scoring: dict[str, Any],
) -> dict[str, Any]:
    ids = [s.id for s in subjects]
    codegraph = None
    if scoring.get("graph") is not None:
        communities = [[ids[v] for v in members] for members in scoring["communities"]]
        codegraph = {
            "communities": communities,
            "outlier_communities": [communities[c] for c in scoring["outlier_communities"]],
            "excluded_fraction": scoring["excluded_fraction"],
            "graph_edges": int(scoring["graph"].ecount()),
            "details": scoring["codegraph_summary"],
        }
    return {
        "volscan_version": _version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": source,
        "kind": kind,
        "n_subjects": len(subjects),
        "settings": dict(config.to_dict(), device_resolved=device, cache_resolved=str(cache_root)),
        "warnings": [RANDOM_WEIGHTS_WARNING] if token_info["random_weights"] else [],
        "preprocess": prepared.info,
        "tokens": token_info,
        "scoring": scoring["scoring_config"],
        "token_grid": token_info["grid"],
        "codegraph": codegraph,
        "excluded_fraction": codegraph["excluded_fraction"] if codegraph else 0.0,
        "subjects": [],
        "metrics": None,
        "figures": {},
        "timings_s": {},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("volscan")
    except PackageNotFoundError:
        return "unknown"


def _montages(
    work: Path, report: dict[str, Any], subjects: list[Subject], elements: RunElements, prepared: _Prepared, top: int
) -> None:
    """Slice montages (3D) or overlays (2D) of the `top` highest-ranked scans, mask outlined."""
    index = {s.id: i for i, s in enumerate(subjects)}
    low, high = score_range(elements.element_scores)
    labels = label_cube_loader(work, elements, [s.label for s in subjects])
    for entry in report["subjects"][:top]:
        i = index[entry["id"]]
        image, brain = prepared.load[i]()
        mask = labels(i)[1] if subjects[i].label is not None else None
        name = f"top{entry['rank']:02d}_{entry['id']}.png"
        title = f"rank {entry['rank']}: {entry['id']} (score {entry['score']:.4g})"
        montage_figure(
            image, upsample_scores(elements.element_scores[i], elements.size), title,
            work / FIGURES_DIR / name, mask=mask, low=low, high=high, region=brain,
        )
        report["figures"][f"rank {entry['rank']}: {entry['id']}"] = f"{FIGURES_DIR}/{name}"
