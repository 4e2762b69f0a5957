"""Frozen 2D ViT backbones (DINOv2, CLIP) built by timm, and the choice of their token layers.

Weights come from one of three places, and the returned model remembers which
(`model.volscan_identity`, a `BackboneIdentity`) so caches and reports can name them:

* `weights=None`: timm's pretrained weights from the Hugging Face hub (or its local cache,
  read with no request). Not cached and the hub unreachable -> one `VolscanError` explaining
  `--weights PATH` within `volumetric.hub.PROBE_TIMEOUT_S`, before the model is built.
* `weights=PATH`: a local file, either timm's own format (`.safetensors`/`.pth`, e.g. written by
  `save_backbone_weights`) or the official DINOv2 checkpoint (`dinov2_vitl14_pretrain.pth`),
  or a downloaded timm hub model folder (its `model.safetensors` / `pytorch_model.bin`).
  Loaded through `pretrained_cfg_overlay=dict(file=PATH)` so timm's checkpoint filter converts
  the official key layout (`checkpoint_path=` would skip that conversion).
* `weights="random"`: random init from a seed, for smoke tests only; logs a loud warning and
  sets `random_weights=True`, because anomaly scores from it mean nothing on real data.

Every model is built with `dynamic_img_size=True` so any image side that is a multiple of the
patch size works (the position embeddings are interpolated by timm).

Default layers (`default_layers`): two blocks, at 1/2 and 3/4 of the depth (ViT-L/14, 24 blocks:
blocks 11 and 17, zero-based). MuSc scores four blocks of ViT-L, [5, 11, 17, 23]; the 3D method
uses two, unnamed. The first quarter is close to pixel statistics (intensity, edges) and the
last block is the most semantic and, for DINOv2-L without registers, carries the high-norm
"artifact" tokens; the middle pair describes local tissue texture and its context, which is what
a lesion changes. Expressed as fractions of the depth so tiny test models resolve too.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from volumetric.atomic_files import atomic_path
from volumetric.devices import resolve_device
from volumetric.errors import InputFileError, VolscanError, first_line
from volumetric.hashing import file_sha256
from volumetric.hub import HubUnavailable, hub_offline, require_hub_weights

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "vit_large_patch14_dinov2.lvd142m"
# Fractions of the depth at which the default token layers sit (see module docstring).
DEFAULT_LAYER_FRACTIONS = (0.5, 0.75)
RANDOM_WEIGHTS_WARNING = "random weights: scores are meaningless on real data"
_HUB_UNAVAILABLE = ("cannot get pretrained weights for {name} from the Hugging Face hub ({why}); offline, "
                    "download them elsewhere and pass --weights PATH (timm .safetensors/.pth or the official DINOv2 .pth)")
_NOT_VIT = "backbone {name!r} is not a ViT with patch tokens (need a timm VisionTransformer, e.g. a DINOv2 or CLIP ViT)"


@dataclass(frozen=True)
class BackboneIdentity:
    """What a backbone is, for cache keys and reports.

    `weights` is `"hub:<name.tag>"`, `"file:<sha256>"` or `"random:<seed>"`. `model_kwargs` is the
    sorted JSON of the options the model was built with (they change the tokens even when the
    weights file fits, e.g. `init_values` of a random model).
    """

    name: str
    weights: str
    random_weights: bool
    model_kwargs: str = "{}"


def check_backbone_name(name: str) -> None:
    """Refuse names timm does not know, suggesting close matches."""
    import timm

    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and (not tag or name in timm.list_pretrained(name)):
        return
    candidates = timm.list_pretrained() if tag else timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*dinov2*')"
    raise VolscanError(f"unknown backbone {name!r}{hint}")


def _build(name: str, model_kwargs: dict, **timm_kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, dynamic_img_size=True, **timm_kwargs, **model_kwargs)
    except TypeError as exc:
        if "dynamic_img_size" in str(exc):
            raise VolscanError(_NOT_VIT.format(name=name)) from None
        raise VolscanError(f"backbone {name!r}: invalid model option ({exc})") from None


def load_failure(exc: BaseException) -> str:
    """One line saying why a weights file did not load: for a state-dict mismatch the counts and
    first names of missing / unexpected / wrongly shaped keys (torch's message puts them on later
    lines), else what the reader said, and for an unpickling crash that it is no checkpoint."""
    text = str(exc).strip()
    if isinstance(exc, RuntimeError) and "Error(s) in loading state_dict" in text:
        parts = []
        for label, pattern in (("missing", r'Missing key\(s\) in state_dict: (.*?)\.\s*$'),
                               ("unexpected", r'Unexpected key\(s\) in state_dict: (.*?)\.\s*$')):
            match = re.search(pattern, text, re.M)
            if match:
                keys = re.findall(r'"([^"]+)"', match.group(1))
                parts.append(f"{len(keys)} {label} key(s) (e.g. {keys[0]})")
        shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", text)
        if shapes:
            key, got, want = shapes[0]
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {key}: file {got}, model {want})")
        return ("the file's keys do not match the model: " + "; ".join(parts)
                + " (is it a checkpoint of another model? check --backbone and backbone_kwargs)")
    if isinstance(exc, OSError) and exc.strerror:  # torch's zip reader says EINVAL for a cut-off file
        return f"cannot read it ({exc.strerror}{'; truncated or not a checkpoint' if exc.errno == 22 else ''})"
    first = text.splitlines()[0] if text else ""
    if type(exc).__name__ == "SafetensorError":
        return f"not a complete safetensors file ({first})"
    if "weights_only" in text:
        return "not a plain weights checkpoint (it holds pickled Python objects, which volscan does not load)"
    if isinstance(exc, (IndexError, KeyError, EOFError)) or type(exc).__name__ == "UnpicklingError":
        return f"not a PyTorch or safetensors checkpoint (unpickling failed: {type(exc).__name__} {first})".rstrip()
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# Names of the weight file inside a downloaded timm / Hugging Face model folder, preferred first.
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def weights_file(path: str | os.PathLike[str]) -> Path:
    """The weights file itself, or the one inside a downloaded hub model folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in _FOLDER_WEIGHTS if (path / name).is_file()]
        if not found:
            raise InputFileError(path, f"folder holds no weights file ({' or '.join(_FOLDER_WEIGHTS)})")
        return found[0]
    if not path.is_file():
        raise InputFileError(path, "weights file not found")
    return path


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    random_seed: int = 0,
    **model_kwargs,
) -> nn.Module:
    """Build a frozen timm ViT (eval mode, no gradients) on `device`.

    `weights`: None = hub pretrained, a path = local weights file, "random" = random init from
    `random_seed`. `model_kwargs` go to `timm.create_model` (e.g. `depth=3, embed_dim=48,
    num_heads=2` for tiny test models). The result carries `volscan_identity`.
    """
    check_backbone_name(name)
    dev = resolve_device(device)
    if weights is not None and str(weights) == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            model = _build(name, model_kwargs, pretrained=False)
        identity = BackboneIdentity(name, f"random:{random_seed}", True)
        log.warning("backbone %s built with %s", name, RANDOM_WEIGHTS_WARNING.upper())
    elif weights is not None:
        path = weights_file(weights)
        try:
            model = _build(name, model_kwargs, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        except VolscanError:
            raise
        except Exception as exc:  # unpickling garbage raises anything (IndexError, UnpicklingError, ...)
            raise InputFileError(path, f"cannot load as {name} weights: {load_failure(exc)}") from None
        identity = BackboneIdentity(name, f"file:{file_sha256(path)}", False)
    else:
        try:
            cached = require_hub_weights(name)  # before building: ViT-L alone takes seconds
        except HubUnavailable as exc:
            raise VolscanError(_HUB_UNAVAILABLE.format(name=name, why=exc)) from None
        try:
            with hub_offline() if cached is not None else contextlib.nullcontext():
                model = _build(name, model_kwargs, pretrained=True)
        except VolscanError:
            raise
        except RuntimeError as exc:  # timm's strict load_state_dict: hub weights vs model options
            raise VolscanError(f"pretrained {name} weights do not fit the requested model ({first_line(exc)})") from None
        except Exception as exc:  # the hub client raises many types (OSError, HTTP errors, ...)
            raise VolscanError(_HUB_UNAVAILABLE.format(name=name, why=type(exc).__name__)) from None
        tag = model.pretrained_cfg.get("tag") or ""
        identity = BackboneIdentity(name, f"hub:{model.pretrained_cfg.get('architecture', name)}.{tag}", False)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "patch_embed"):
        raise VolscanError(_NOT_VIT.format(name=name))
    model.requires_grad_(False)
    model.eval().to(dev)
    model.volscan_identity = replace(identity, model_kwargs=json.dumps(model_kwargs, sort_keys=True, default=str))
    return model


def backbone_identity(model: nn.Module) -> BackboneIdentity:
    """The identity `create_backbone` attached, or a best guess for a model built elsewhere."""
    identity = getattr(model, "volscan_identity", None)
    if identity is not None:
        return identity
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    name = f"{cfg.get('architecture', type(model).__name__)}.{cfg.get('tag', '')}"
    return BackboneIdentity(name, "unknown", False)


def patch_size(model: nn.Module) -> int:
    """Edge of the (square) patch in pixels, e.g. 14 for DINOv2."""
    size = model.patch_embed.patch_size
    size = tuple(size) if isinstance(size, Sequence) else (size, size)
    if size[0] != size[1]:
        raise VolscanError(f"backbone has non-square patches {size}; need square patches")
    return int(size[0])


def default_layers(depth: int) -> list[int]:
    """Zero-based block indices used by default for a ViT with `depth` blocks (ViT-L: [11, 17])."""
    return sorted({max(math.ceil(f * depth) - 1, 0) for f in DEFAULT_LAYER_FRACTIONS})


def resolve_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Validate block indices (negative allowed) against the model depth; return them non-negative.

    Raises `VolscanError` for an out-of-range, repeated or non-integer index; never drops one.
    """
    depth = len(model.blocks)
    if layers is None:
        return default_layers(depth)
    if isinstance(layers, (int, str)) or len(layers) == 0:
        raise VolscanError(f"layers must be a non-empty list of block indices, got {layers!r}")
    out: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise VolscanError(f"layer index {layer!r} is not an integer")
        if not -depth <= layer < depth:
            raise VolscanError(f"layer index {layer} out of range for a backbone with {depth} blocks "
                               f"(valid: {-depth}..{depth - 1})")
        idx = layer % depth
        if idx in out:
            raise VolscanError(f"layer {layer} repeats block {idx} in layers {list(layers)}")
        out.append(idx)
    return out


def save_backbone_weights(model: nn.Module, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write the model's weights atomically as timm-loadable `.safetensors` (or `.pth` otherwise)."""
    path = Path(path)
    if path.exists() and not force:
        raise InputFileError(path, "already exists (use force=True to overwrite)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp)
        else:
            torch.save(state, tmp)
    return path
