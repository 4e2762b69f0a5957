"""Hugging Face hub weights for timm backbones: found in the local cache, or the hub reachable.

Offline, the hub client retries every request with back-off (a minute of warning lines per file
before it gives up), and timm builds the whole model before asking. So `create_backbone` asks
here first, before building anything:

* the weights timm would download (`model.safetensors`, else `pytorch_model.bin`, of the model's
  `hf_hub_id`) already in the hub cache: timm loads them with the client in offline mode
  (`hub_offline`), so no request is made and no retry can happen;
* not cached: one TCP connection to the hub's host (or the HTTPS proxy), `PROBE_TIMEOUT_S` at
  most including name resolution; unreachable, or `HF_HUB_OFFLINE` set -> `HubUnavailable`
  (one line, raised by the caller as a `VolscanError`), with no request to the hub client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Name resolution + TCP connect; a reachable hub answers in well under a second.
PROBE_TIMEOUT_S = 1.5
# timm's order: the safetensors alternative first, then the pickle it names (timm.models._hub).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class HubUnavailable(Exception):
    """The weights are not cached and the hub cannot be reached; `str()` says which and why."""


@dataclass(frozen=True)
class HubSource:
    """Where timm looks for a model's pretrained weights: hub `repo_id` and `revision` (None: main)."""

    repo_id: str
    revision: str | None


def hub_source(name: str) -> HubSource | None:
    """The hub repository timm downloads `name`'s pretrained weights from (None: not on the hub)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo_id, _, revision = hub_id.partition("@")
    return HubSource(repo_id, revision or None)


def cached_weights(source: HubSource) -> Path | None:
    """The cached weights file timm would load for `source`, or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(source.repo_id, filename, revision=source.revision)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_address() -> tuple[str, int]:
    """(host, port) a download would connect to first: the HTTPS proxy if one is set, else the hub."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return target.hostname or "", target.port or 80
    return endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)


def reachable(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout_s` (name resolution included:
    `getaddrinfo` has no timeout of its own, so the attempt runs in a daemon thread)."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])


def require_hub_weights(name: str) -> Path | None:
    """Cached weights of `name` (load them offline), or None when the hub is reachable to
    download them; `HubUnavailable` when neither."""
    from huggingface_hub import constants

    source = hub_source(name)
    if source is None:
        return None
    cached = cached_weights(source)
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailable(f"HF_HUB_OFFLINE is set and {source.repo_id} is not in the hub cache")
    host, port = hub_address()
    if not reachable(host, port):
        raise HubUnavailable(f"{host}:{port} unreachable within {PROBE_TIMEOUT_S:g} s and {source.repo_id} "
                             "is not in the hub cache")
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The hub client in offline mode for the block (cache only, no request, so no retries)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
