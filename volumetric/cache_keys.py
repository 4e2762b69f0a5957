"""Every cache location and key volscan uses, composed in one place (torch-free).

A cache folder (`--cache`, default `preprocessing.template.cache_dir()`) holds
`preprocess/<store name>/` (one preprocessing store per cohort), `tokens/<key[:2]>/<key>.safetensors`
(one token set per model input and token settings) and `extract/<store name>/` (`volscan
extract`'s error logs). No key holds a path: only content and settings, so jobs that see the
inputs or the cache at other paths share them. The keys:

| key | made of | checked by |
|---|---|---|
| `scan_key` | input content hash + `PreprocessSettings.spatial_key` (`PIPELINE_VERSION`, template identity, resolved mask method, ...) | `preprocessing.cohort` (spatial outputs) |
| `landmarks_key` | every subject's `scan_key` + the Nyúl cutoff | `preprocessing.cohort` (learned landmarks) |
| `standardised_key` | `scan_key` + `Landmarks.digest` | `preprocessing.cohort` (standardised cube) |
| `store_name` | subject ids + content fingerprints, cube size, template files' hashes, N4 settings when N4 applies | the store's folder name |
| `token_key` | `model_input_hash` (cube and brain mask) + the tokenizer's `settings` + cube size + `TOKEN_FORMAT_VERSION` | `volumetric.token_cache` (file header) |

The values must stay what earlier volscan versions computed for the same inputs and settings
(tests/test_cache_keys.py pins them): a changed key silently recomputes every user's cache.
Bump a version below instead when outputs change on purpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volumetric.errors import VolscanError
from volumetric.hashing import content_fingerprint, content_hash, digest

# Version of the preprocessing outputs, part of every `scan_key`: bump when a change of the chain
# changes outputs made with the same settings (invalidates caches).
# 3: cubes stored as scaled int16 (`preprocessing.io.save_volume(scaled_int16=True)`).
PIPELINE_VERSION = 3
# Version of the token file format, part of every `token_key` and every token file's header
# (`volumetric.token_set`): bump whenever token construction or the file layout changes.
# 2: intermediate tokens through the backbone's final norm. 3: the cache key in the header,
# float16 layers allowed.
TOKEN_FORMAT_VERSION = 3
# HD-BET masks changed when the scan went in FSL standard order and came back by HD-BET v1's
# resize (`preprocessing.hdbet`): HD-BET stores made with older masks are not reused.
HDBET_MASK_REVISION = 2
# Hex characters of a preprocessing store's folder name.
_STORE_NAME_LENGTH = 24


def preprocess_root(cache_root: Path) -> Path:
    """Where a cache's preprocessing stores live."""
    return cache_root / "preprocess"


def preprocess_store(cache_root: Path, name: str) -> Path:
    """A cohort's preprocessing store, `<cache>/preprocess/<name>` (`name` from `store_name`)."""
    return preprocess_root(cache_root) / name


def tokens_root(cache_root: Path) -> Path:
    """Root of a cache's token files (`volumetric.token_cache.TokenCache`)."""
    return cache_root / "tokens"


def token_file(root: Path, key: str) -> Path:
    """The file of token entry `key` under the tokens root `root`: `<root>/<key[:2]>/<key>.safetensors`."""
    return root / key[:2] / f"{key}.safetensors"


def extract_logs_root(cache_root: Path) -> Path:
    """Where a cache's `volscan extract` error logs live."""
    return cache_root / "extract"


def extract_logs(cache_root: Path, name: str) -> Path:
    """The error logs' folder of the cohort whose store is named `name`."""
    return extract_logs_root(cache_root) / name


def scan_key(source: Path, spatial_settings: Mapping[str, Any]) -> str:
    """Key of one scan's spatial outputs: its content and every setting that changes them
    (`PreprocessSettings.spatial_key`)."""
    return digest({"input": content_hash(source), "settings": spatial_settings})


def landmarks_key(scan_keys: Iterable[tuple[str, str]], cutoff: Sequence[float]) -> str:
    """Key of landmarks learned on a cohort: every (subject id, `scan_key`) and the cutoff."""
    return digest({"subjects": sorted(scan_keys), "cutoff": list(cutoff)})


def standardised_key(scan_key: str, landmarks_digest: str) -> str:
    """Key of a standardised cube: its spatial output and the landmarks applied."""
    return digest({"spatial": scan_key, "landmarks": landmarks_digest})


def store_name(inputs: Iterable[tuple[str, Path]], size: int, template_files: Sequence[Path] | None,
               n4: Mapping[str, Any] | None) -> str:
    """Folder name of a cohort's preprocessing store: one per cohort and spatial settings.

    `inputs`: (subject id, path), named by their content fingerprints (a few sampled blocks
    per file); `template_files`: the template's files, named by their content (None for 2D
    inputs); `n4`: the N4 settings' key when N4 applies, else None (screens with and without N4
    get their own stores)."""
    key: dict[str, Any] = {"inputs": sorted((sid, content_fingerprint(path)) for sid, path in inputs),
                           "size": size,
                           "template": None if template_files is None else [content_hash(p) for p in template_files]}
    if n4 is not None:
        key.update(bias_correction="n4", n4=dict(n4))
    return digest(key, _STORE_NAME_LENGTH)


def model_input_hash(array: np.ndarray, brain_mask: np.ndarray | None) -> str:
    """Content hash of a model input: the cube or image and its brain mask (if any)."""
    source = content_hash(array) + (content_hash(brain_mask) if brain_mask is not None else "")
    return hashlib.sha256(source.encode()).hexdigest()


def keyed_token_settings(tokenizer_settings: Mapping[str, Any], size: int) -> dict[str, Any]:
    """What a token entry is keyed by besides its input: the tokenizer's `settings` and the
    cube or image `size`."""
    return dict(tokenizer_settings, size=size)


def token_key(input_hash: str, settings: Mapping[str, Any]) -> str:
    """Hex key of a token entry from its input's hash (`model_input_hash`) and `keyed_token_settings`."""
    try:
        blob = json.dumps({"input": input_hash, "settings": dict(settings), "format": TOKEN_FORMAT_VERSION},
                          sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise VolscanError(f"token cache settings must be JSON-serialisable: {exc}") from None
    return hashlib.sha256(blob.encode()).hexdigest()
