"""Backbones: names, weights (random / file / official DINOv2 layout / offline hub), layers."""

from __future__ import annotations

import logging

import pytest
import torch

from volumetric.backbones import (
    create_backbone,
    default_layers,
    patch_size,
    resolve_layers,
    save_backbone_weights,
)
from volumetric.errors import InputFileError, VolscanError
from volumetric.hashing import file_sha256


def _split(spec: dict) -> tuple[str, dict]:
    spec = dict(spec)
    return spec.pop("name"), spec


def _outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    x = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)


@pytest.fixture(scope="module")
def tiny(tiny_vit_spec):
    name, kwargs = _split(tiny_vit_spec)
    return create_backbone(name, weights="random", random_seed=5, **kwargs)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(VolscanError, match="vit_small_patch14_dinov2") as info:
        create_backbone("vit_small_patch14_dinov3", weights="random")
    assert "unknown backbone" in str(info.value)
    with pytest.raises(VolscanError, match="unknown backbone"):
        create_backbone("vit_small_patch14_dinov2.no_such_tag", weights="random")


def test_non_vit_and_bad_options_are_refused(tiny_vit_spec):
    with pytest.raises(VolscanError, match="not a ViT"):
        create_backbone("resnet18", weights="random")
    name, kwargs = _split(tiny_vit_spec)
    with pytest.raises(VolscanError, match="invalid model option"):
        create_backbone(name, weights="random", no_such_option=1, **kwargs)
    with pytest.raises(VolscanError, match="device"):
        create_backbone(name, weights="random", device="warp-drive", **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(VolscanError, match="no CUDA GPU"):
            create_backbone(name, weights="random", device="cuda", **kwargs)


def test_random_weights_are_frozen_flagged_loud_and_seeded(tiny_vit_spec, caplog):
    name, kwargs = _split(tiny_vit_spec)
    with caplog.at_level(logging.WARNING, logger="volumetric.backbones"):
        model = create_backbone(name, weights="random", random_seed=1, **kwargs)
    assert "MEANINGLESS ON REAL DATA" in caplog.text
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.volscan_identity.random_weights and model.volscan_identity.weights == "random:1"
    assert patch_size(model) == 14 and len(model.blocks) == kwargs["depth"]
    same = create_backbone(name, weights="random", random_seed=1, **kwargs)
    other = create_backbone(name, weights="random", random_seed=2, **kwargs)
    for a, b, c in zip(_outputs(model), _outputs(same), _outputs(other)):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_saved_weights_load_back_identically(tiny, tiny_vit_spec, tmp_path, suffix):
    name, kwargs = _split(tiny_vit_spec)
    path = save_backbone_weights(tiny, tmp_path / f"tiny{suffix}")
    loaded = create_backbone(name, weights=path, **kwargs)
    assert loaded.volscan_identity.weights == f"file:{file_sha256(path)}"
    assert not loaded.volscan_identity.random_weights
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    for a, b in zip(_outputs(tiny), _outputs(loaded)):
        assert torch.equal(a, b)
    with pytest.raises(InputFileError, match="already exists"):
        save_backbone_weights(tiny, path)


def test_hub_model_folder_is_accepted(tiny, tiny_vit_spec, tmp_path):
    name, kwargs = _split(tiny_vit_spec)
    with pytest.raises(InputFileError, match="folder holds no weights file"):
        create_backbone(name, weights=tmp_path, **kwargs)
    save_backbone_weights(tiny, tmp_path / "model.safetensors")
    loaded = create_backbone(name, weights=tmp_path, **kwargs)
    for a, b in zip(_outputs(tiny), _outputs(loaded)):
        assert torch.equal(a, b)


def test_official_dinov2_checkpoint_layout_is_converted(tiny, tiny_vit_spec, tmp_path):
    # The official DINOv2 .pth carries a `mask_token` timm does not have; only timm's checkpoint
    # filter (run through pretrained_cfg_overlay) drops it, a plain strict load would fail.
    name, kwargs = _split(tiny_vit_spec)
    state = dict(tiny.state_dict())
    state["mask_token"] = torch.zeros(1, kwargs["embed_dim"])
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    loaded = create_backbone(name, weights=path, **kwargs)
    for a, b in zip(_outputs(tiny), _outputs(loaded)):
        assert torch.equal(a, b)


def test_bad_weight_files_name_the_file(tiny, tiny_vit_spec, tmp_path):
    name, kwargs = _split(tiny_vit_spec)
    with pytest.raises(InputFileError, match="not found"):
        create_backbone(name, weights=tmp_path / "missing.safetensors", **kwargs)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputFileError, match="garbage.pth: cannot load"):
        create_backbone(name, weights=garbage, **kwargs)
    wrong = save_backbone_weights(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(InputFileError, match="tiny.safetensors: cannot load"):
        create_backbone(name, weights=wrong, **dict(kwargs, embed_dim=64))


def test_offline_hub_gives_one_clear_error(tiny_vit_spec, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    name, kwargs = _split(tiny_vit_spec)
    with pytest.raises(VolscanError, match="--weights PATH") as info:
        create_backbone(name, **kwargs)
    assert "\n" not in str(info.value)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """An empty hub cache, the hub at a closed local port, no proxy; counts what would reach it."""
    import huggingface_hub.constants as hf_constants
    import timm.models._hub as timm_hub

    from volumetric import hub

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    calls = {"probe": 0, "download": 0}
    probe, download = hub.reachable, timm_hub.hf_hub_download

    def counted_probe(*args, **kwargs):
        calls["probe"] += 1
        return probe(*args, **kwargs)

    def counted_download(*args, **kwargs):
        calls["download"] += 1
        return download(*args, **kwargs)

    monkeypatch.setattr(hub, "reachable", counted_probe)
    monkeypatch.setattr(timm_hub, "hf_hub_download", counted_download)
    return tmp_path / "hub", calls


def test_unreachable_hub_is_one_line_before_any_build_or_retry(tiny_vit_spec, unreachable_hub, caplog):
    _, calls = unreachable_hub
    name, kwargs = _split(tiny_vit_spec)
    with caplog.at_level(logging.DEBUG), pytest.raises(VolscanError) as info:
        create_backbone(name, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "127.0.0.1:9 unreachable" in message and "--weights PATH" in message
    # One connection attempt, then no request through the hub client: nothing to retry.
    assert calls == {"probe": 1, "download": 0}
    assert "Retrying" not in caplog.text


def test_cached_hub_weights_load_with_no_request(tiny, tiny_vit_spec, unreachable_hub, caplog):
    from safetensors.torch import save_file

    from volumetric.hub import hub_source

    cache, calls = unreachable_hub
    name, kwargs = _split(tiny_vit_spec)
    repo = cache / f"models--{hub_source(name).repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, repo / "snapshots" / commit / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = create_backbone(name, **kwargs)
    assert calls["probe"] == 0 and calls["download"] == 1  # timm read the cache, offline
    assert "Retrying" not in caplog.text
    assert loaded.volscan_identity.weights.startswith("hub:") and not loaded.volscan_identity.random_weights
    for a, b in zip(_outputs(tiny), _outputs(loaded)):
        assert torch.equal(a, b)
    import huggingface_hub.constants as hf_constants

    assert hf_constants.HF_HUB_OFFLINE is False  # offline only while loading


@pytest.mark.parametrize(("depth", "expected"), [(24, [11, 17]), (12, [5, 8]), (40, [19, 29]),
                                                 (3, [1, 2]), (2, [0, 1]), (1, [0])])
def test_default_layers_resolve_for_any_depth(depth, expected):
    assert default_layers(depth) == expected


def test_layer_indices_are_validated_never_dropped(tiny):
    assert resolve_layers(tiny, None) == [1, 2]
    assert resolve_layers(tiny, [-1, 0]) == [2, 0]
    with pytest.raises(VolscanError, match=r"out of range .* 3 blocks \(valid: -3\.\.2\)"):
        resolve_layers(tiny, [0, 3])
    with pytest.raises(VolscanError, match="repeats block 0"):
        resolve_layers(tiny, [0, -3])
    with pytest.raises(VolscanError, match="not an integer"):
        resolve_layers(tiny, [1.0])
    with pytest.raises(VolscanError, match="non-empty"):
        resolve_layers(tiny, [])
