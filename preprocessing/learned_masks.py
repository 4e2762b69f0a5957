"""Learned brain extractors: deepbet (offline, weights in its wheel) and HD-BET (weights fetched once).

Both return a (X, Y, Z) bool mask in the input's own voxel order. Models are built once per
process and device (`_models`), so a cohort pays the load once.

HD-BET weights: `--hdbet-weights DIR` (a folder holding HD-BET's `plans.json`, `dataset.json`
and `fold_all/checkpoint_final.pth`, e.g. its release zip unzipped on a machine that is online)
or, by default, `<volscan cache>/hd-bet/<release>`, downloaded there once from HD-BET's own
address while online. Nothing is ever written to HD-BET's default `~/hd-bet_params`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.io import Volume, load_volume, save_volume
from preprocessing.template import cache_dir
from volumetric.errors import InputFileError, VolscanError

log = logging.getLogger(__name__)

HDBET_RELEASE = "release_2.0.0"  # HD-BET 2.x's folder name for its parameters
# HD-BET 2.0.1's `HD_BET.paths.ZENODO_DOWNLOAD_URL` (read from the package when it is installed).
HDBET_URL = "https://zenodo.org/records/14445620/files/release_v1.5.0.zip?download=1"
HDBET_FILES = ("plans.json", "dataset.json", "fold_all/checkpoint_final.pth")
HDBET_INSTALL = "pip install 'volscan[hd-bet]' (or pip install hd-bet)"
DEEPBET_INSTALL = "pip install deepbet"

_models: dict[tuple[str, str, str], Any] = {}


def deepbet_available() -> bool:
    """True when the `deepbet` package is importable (its weights ship inside it)."""
    return importlib.util.find_spec("deepbet") is not None


def hdbet_installed() -> bool:
    """True when the `HD_BET` package (and so nnU-Net) is importable."""
    return importlib.util.find_spec("HD_BET") is not None


def hdbet_available(weights: str | Path | None = None) -> bool:
    """True when HD-BET is importable and its weights are already local (no download needed)."""
    if not hdbet_installed():
        return False
    folder = Path(weights).expanduser() if weights else default_hdbet_dir()
    return _complete(folder) or _complete(folder / HDBET_RELEASE)


def default_hdbet_dir() -> Path:
    """Where volscan keeps HD-BET's weights: `<volscan cache>/hd-bet/<release>`."""
    return cache_dir() / "hd-bet" / HDBET_RELEASE


def hdbet_weights_dir(weights: str | Path | None = None, download: bool = True) -> Path:
    """The HD-BET weights folder: `weights` if given (checked, never downloaded into), else the
    cache folder, downloaded there once when missing and `download` is True."""
    if weights:
        folder = Path(weights).expanduser()
        if not _complete(folder) and (folder / HDBET_RELEASE).is_dir():
            folder = folder / HDBET_RELEASE  # the parent of the release folder was given
        if not _complete(folder):
            missing = [f for f in HDBET_FILES if not (folder / f).is_file()]
            raise VolscanError(
                f"{folder}: not an HD-BET weights folder (missing {', '.join(missing)}); unzip HD-BET's "
                f"release zip ({HDBET_URL}) there, or leave --hdbet-weights out to download it into volscan's cache"
            )
        return folder
    folder = default_hdbet_dir()
    if _complete(folder):
        return folder
    if not download:
        raise VolscanError(f"HD-BET weights are not in {folder}; run once online or pass --hdbet-weights DIR")
    return download_hdbet_weights(folder)


def download_hdbet_weights(folder: Path, url: str | None = None) -> Path:
    """Download HD-BET's release zip from `url` and unpack it into `folder` (atomically: a partial
    download never looks complete). Returns `folder`."""
    url = url or _hdbet_url()
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.warning("downloading HD-BET weights (once) from %s into %s", url, folder)
    with tempfile.TemporaryDirectory(prefix=".hd-bet-download-", dir=folder.parent) as tmp:
        archive = Path(tmp) / "weights.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as handle:
                shutil.copyfileobj(response, handle, 1 << 20)
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(Path(tmp) / "unpacked")
        except (urllib.error.URLError, OSError, zipfile.BadZipFile, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise VolscanError(
                f"HD-BET weights are not in {folder} and could not be downloaded from {url} ({reason}); "
                "offline: fetch that zip on a machine that is online, unzip it and pass --hdbet-weights DIR, "
                "or use --brain-mask deepbet"
            ) from None
        found = [p.parent for p in (Path(tmp) / "unpacked").rglob("plans.json") if _complete(p.parent)]
        if not found:
            raise VolscanError(f"{url}: the download holds no HD-BET weights ({', '.join(HDBET_FILES)})")
        if not _complete(folder):  # another process may have finished first
            shutil.rmtree(folder, ignore_errors=True)
            found[0].rename(folder)
    return folder


def hdbet_mask(volume: Volume, weights: str | Path | None = None, device: str = "cpu") -> np.ndarray:
    """HD-BET brain mask of `volume`: (X, Y, Z) bool in its voxel order (no test-time mirroring)."""
    if not hdbet_installed():
        raise VolscanError(f"brain mask method 'hd-bet' needs HD-BET: {HDBET_INSTALL}; or use --brain-mask deepbet")
    folder = hdbet_weights_dir(weights)
    predictor = _model("hd-bet", str(folder), device)
    with tempfile.TemporaryDirectory(prefix="volscan-hdbet-") as tmp:
        source = save_volume(volume.array, volume.affine, Path(tmp) / "scan_0000.nii.gz", dtype=np.float32)
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net reports progress with print()
            predictor.predict_from_files_sequential([[str(source)]], [str(Path(tmp) / "mask")], False, True, None)
        mask = load_volume(Path(tmp) / "mask.nii.gz")
    return _on_grid(mask, volume, "HD-BET")


def deepbet_mask(volume: Volume, device: str = "cpu") -> np.ndarray:
    """deepbet brain mask of `volume`: (X, Y, Z) bool in its voxel order (threshold 0.5, no dilation)."""
    if not deepbet_available():
        raise VolscanError(f"brain mask method 'deepbet' needs deepbet: {DEEPBET_INSTALL}")
    import nibabel as nib

    extractor = _model("deepbet", "", device)
    _, mask, _ = extractor.run(nib.Nifti1Image(np.asarray(volume.array, dtype=np.float32), volume.affine))
    return np.asarray(mask.dataobj) > 0


def _model(kind: str, weights: str, device: str) -> Any:
    key = (kind, weights, device)
    if key not in _models:
        import torch

        torch_device = torch.device(device)
        if kind == "deepbet":
            from deepbet import BrainExtraction

            with warnings.catch_warnings():  # deepbet's TorchScript files: "torch.jit.load is deprecated"
                warnings.simplefilter("ignore", FutureWarning)
                extractor = BrainExtraction(no_gpu=True)
            extractor.model.to(torch_device)
            extractor.bbox_model.to(torch_device)
            _models[key] = extractor
        else:
            # nnU-Net print()s notes (its env variables, CPU use) on stdout, where the CLI's own output goes.
            with contextlib.redirect_stdout(io.StringIO()):
                from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

                # HD-BET 2's own predictor settings (`get_hdbet_predictor`), without test-time mirroring.
                predictor = nnUNetPredictor(
                    tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                    perform_everything_on_device=torch_device.type == "cuda",  # nnU-Net supports it on CUDA only
                    device=torch_device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
                )
                predictor.initialize_from_trained_model_folder(weights, ("all",))
            _models[key] = predictor
    return _models[key]


def _hdbet_url() -> str:
    try:
        from HD_BET.paths import ZENODO_DOWNLOAD_URL
    except ImportError:
        return HDBET_URL
    return ZENODO_DOWNLOAD_URL


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in HDBET_FILES)


def _on_grid(mask: Volume, volume: Volume, tool: str) -> np.ndarray:
    if mask.array.shape != volume.array.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
        raise InputFileError(volume.path or "volume", f"{tool} returned a mask on a different grid")
    return mask.array > 0
