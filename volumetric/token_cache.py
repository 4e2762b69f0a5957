"""On-disk cache of `TokenSet`s, so re-scoring with other engine settings never re-extracts tokens.

An entry's key (`volumetric.cache_keys.token_key`) is a SHA-256 over the input's content hash, every token setting (backbone name,
weights identity, layers, proj_dim, seed, size, void_fraction, intensity map, precision... as
a JSON object with sorted keys) and `TOKEN_FORMAT_VERSION`; change any of them and the key
changes. Entries are `<root>/<key[:2]>/<key>.safetensors`, written atomically by
`TokenSet.save` with the key in the file's header and the layers in float16 (`STORAGE_DTYPE`:
half the bytes; the scores' change is measured in docs/tokens.md). `load` verifies the file's
checksum and that it was written for the key it is read under (a token file copied or moved onto
another scan's name is refused like a corrupt one), and deletes (and logs, naming the file)
anything corrupt, partial or misplaced, reporting a miss so the caller rebuilds it; a reader
that must not write (`discard=False`) gets the one-line error instead. Safe to share between processes: a
reader sees either no entry or a complete one; the first `store` into a `<key[:2]>` folder removes
the temporaries killed runs of this host left there (`volumetric.atomic_files`). A hit by a
writer sets the file's modification time: it is the entry's last use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from volumetric.atomic_files import tidy_before_writing
from volumetric.cache_keys import token_file
from volumetric.errors import InputFileError, VolscanError
from volumetric.token_set import TokenSet

log = logging.getLogger(__name__)

# How cache entries store their layers: float16 halves the cache; layers beyond its range stay float32.
STORAGE_DTYPE = torch.float16


class TokenCache:
    """Token files under `root`, addressed by `volumetric.cache_keys.token_key`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise VolscanError(f"{self.root}: token cache location exists and is not a folder")

    def path(self, key: str) -> Path:
        """File that holds (or would hold) the entry `key`."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise VolscanError(f"invalid token cache key {key!r}")
        return token_file(self.root, key)

    def load(self, key: str, *, discard: bool = True) -> TokenSet | None:
        """The cached tokens, or None on a miss; a damaged entry (or one written for another key)
        is logged naming the file, deleted and missed. `discard=False` (readers that must not
        write, `volscan score`): it is left in place and raises `InputFileError` naming it."""
        path = self.path(key)
        if not path.is_file():
            log.debug("token cache miss %s", key)
            return None
        try:
            tokens = TokenSet.load(path, key=key)
        except InputFileError as exc:
            if not discard:
                raise
            log.warning("discarding corrupt token cache entry: %s; rebuilding it", exc)
            path.unlink(missing_ok=True)
            return None
        log.debug("token cache hit %s", key)
        if discard:  # a writer: the file's time becomes its last use (`volscan cache prune --older-than`)
            try:
                os.utime(path)
            except OSError:
                log.debug("could not touch %s", path, exc_info=True)
        return tokens

    def store(self, key: str, tokens: TokenSet) -> Path:
        """Write `tokens` as entry `key` (atomic; replaces an older entry of the same key)."""
        path = self.path(key)
        tidy_before_writing(path.parent)
        return tokens.save(path, key=key, dtype=STORAGE_DTYPE)

    def get_or_compute(self, key: str, compute: Callable[[], TokenSet]) -> TokenSet:
        """Cached tokens for `key`, computing and storing them on a miss (then returned as a
        later `load` returns them: `TokenSet.as_stored`)."""
        tokens = self.load(key)
        if tokens is None:
            tokens = compute()
            self.store(key, tokens)
            tokens = tokens.as_stored(STORAGE_DTYPE)
        return tokens
