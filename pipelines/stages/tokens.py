"""Stage 3 of `volscan screen`: model inputs to token sets, through the token cache.

`VolumeTokenizer` / `ImageTokenizer` results are cached in `<cache>/tokens`, keyed by the
content hash of the preprocessed cube (and brain mask) plus every token setting, so a re-run
with the same settings extracts nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.failures import shown
from pipelines.plan import ClassicalFeatures
from pipelines.stages.preprocess import Prepared
from volumetric.cache_keys import keyed_token_settings, model_input_hash, token_key
from volumetric.errors import InputFileError, VolscanError

if TYPE_CHECKING:
    from volumetric.tokens import TokenSettings

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    """`sets`: one `TokenSet` per subject; `brain_masks`: packed cube masks (N, S^3/8) uint8
    (3D) or None; `info`: facts for the report (settings as used, cache hits, grid); `files`:
    the token sets' cache files."""

    sets: list[Any]
    brain_masks: np.ndarray | None
    info: dict[str, Any]
    files: list[Path] = dataclasses.field(default_factory=list)


def make_tokenizer(
    tokens: "TokenSettings | ClassicalFeatures", size: int, kind: str, device: str, backbone: Any = None
) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, its settings as cached: every token setting plus the cube/image `size`);
    `backbone`: the model the validation pass already loaded (built here when None)."""
    if isinstance(tokens, ClassicalFeatures):  # weights-free: no backbone, same grid, void rule and cache
        from volumetric.classical_tokens import ClassicalTokenizer

        tokenizer = ClassicalTokenizer(**tokens.options)
    else:
        tokenizer = dataclasses.replace(tokens, device=device).build(kind, model=backbone)
    return tokenizer, keyed_token_settings(tokenizer.settings, size)


def extract_tokens(
    ids: list[str], kind: str, prepared: Prepared, tokens: "TokenSettings | ClassicalFeatures", size: int,
    device: str, cache_dir: Path, *, compute: bool = True, backbone: Any = None,
    tokenizer: tuple[Any, dict[str, Any]] | None = None,
) -> Tokens:
    """Token sets of every subject (cached or extracted) in the token cache `cache_dir`; one grid
    for all, none all void; `size`: the cube edge / image side (part of the cache settings).

    `compute=False` extracts nothing: subjects whose tokens are not cached are an error naming them.
    `tokenizer`: `make_tokenizer`'s (tokenizer, settings) when the caller already built it."""
    from tqdm.auto import tqdm

    from pipelines.evaluate import pack_mask  # loads torch and monai (see pipelines.stages)
    from volumetric.classical_tokens import describe_tokenizer
    from volumetric.token_cache import TokenCache

    tokenizer, settings = make_tokenizer(tokens, size, kind, device, backbone) if tokenizer is None else tokenizer
    cache = TokenCache(cache_dir)
    token_sets, packed_masks, computed, missing, keys = [], [], 0, [], []
    for sid, load in zip(ids, tqdm(prepared.load, desc="tokens", unit="vol" if kind == "3d" else "img")):
        array, brain_mask = load()
        if brain_mask is not None:
            packed_masks.append(pack_mask(brain_mask))
        key = token_key(model_input_hash(array, brain_mask), settings)
        keys.append(key)
        try:
            token_set = cache.load(key, discard=compute)  # `volscan score` writes nothing into the shared cache
        except InputFileError as exc:  # only when not computing: a damaged or misplaced entry stays
            raise VolscanError(f"{exc} (tokens of {sid}); run volscan extract with the same settings "
                               "to rebuild it") from None
        if token_set is None and not compute:
            missing.append(sid)
            continue
        if token_set is None:
            token_set = cache.get_or_compute(key, lambda: tokenizer(array, brain_mask) if kind == "3d" else tokenizer(array))
            computed += 1
        token_sets.append(token_set)
    if missing:
        raise VolscanError(f"tokens of {len(missing)} scan(s) are not in {cache.root} (or damaged): {shown(missing)}; "
                           "run volscan extract with the same settings first")
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
        "cache": str(cache.root.resolve()),
        "grid": list(grids.pop()),
        "random_weights": bool(tokenizer.identity.random_weights),
        "features": describe_tokenizer(tokenizer, kind),
    }
    log.info("tokens: %d computed, %d from cache", computed, info["cached"])
    return Tokens(token_sets, np.stack(packed_masks) if packed_masks else None, info, [cache.path(k) for k in keys])
