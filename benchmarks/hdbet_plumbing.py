"""Check volscan's HD-BET path end to end where HD-BET's weights cannot be had (offline machines, CI).

Writes a tiny *untrained* nnU-Net in HD-BET's folder layout (`plans.json`, `dataset.json`,
`fold_all/checkpoint_final.pth`), then runs `preprocessing.learned_masks.hdbet_mask` with it on a
LAS-ordered, anisotropic random volume: the nnU-Net call, the temporary-file round trip and the
grid check. The mask itself is meaningless (random network); Dice needs HD-BET's real weights
(`benchmarks/brain_mask.py --hdbet-weights DIR`). Needs `pip install 'volscan[hd-bet]'`.

    python benchmarks/hdbet_plumbing.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from preprocessing.io import Volume
from preprocessing.learned_masks import HDBET_RELEASE, hdbet_available, hdbet_mask


def write_tiny_weights(root: Path) -> Path:
    """A 2-stage PlainConvUNet (random weights) saved as HD-BET's release folder under `root`."""
    root = root / HDBET_RELEASE
    (root / "fold_all").mkdir(parents=True)
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                            "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    conf = {"data_identifier": "tiny", "preprocessor_name": "DefaultPreprocessor", "batch_size": 1,
            "patch_size": [32, 32, 32], "median_image_size_in_voxels": [64, 64, 64], "spacing": [4.0, 4.0, 4.0],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": arch, "batch_dice": False}
    plans = {"dataset_name": "Tiny", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [4, 4, 4],
             "original_median_shape_after_transp": [64, 64, 64], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": conf},
             "experiment_planner_used": "x", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {"mean": 0, "std": 1, "percentile_00_5": 0, "percentile_99_5": 1}}}
    dataset = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(dataset))
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(
        manager, manager.get_configuration("3d_fullres"), 1, 2, enable_deep_supervision=False
    )
    torch.save({"trainer_name": "nnUNetTrainer", "init_args": {"configuration": "3d_fullres"},
                "network_weights": net.state_dict(), "inference_allowed_mirroring_axes": (0, 1, 2)},
               root / "fold_all" / "checkpoint_final.pth")
    return root


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="volscan-hdbet-check-") as tmp:
        weights = write_tiny_weights(Path(tmp))
        rng = np.random.default_rng(0)
        affine = np.diag([-3.0, 3.0, 2.5, 1.0])  # LAS order, anisotropic voxels
        volume = Volume(rng.random((40, 36, 30)).astype(np.float32) * 100, affine)
        start = time.perf_counter()
        mask = hdbet_mask(volume, weights, "cpu")
        report = {"hdbet_available": hdbet_available(weights), "mask_shape": list(mask.shape),
                  "same_grid": mask.shape == volume.array.shape, "seconds": round(time.perf_counter() - start, 2)}
    json.dump(report, sys.stdout)
    print()
    return 0 if report["same_grid"] else 1


if __name__ == "__main__":
    sys.exit(main())
