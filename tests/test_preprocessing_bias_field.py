"""N4 bias-field correction: the numbers on a phantom with a known field, its settings and cache
keys, the one-line error for non-MR intensities, the MONAI transforms, and the CLI flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from test_preprocessing_data import small_template

from pipelines.cli import build_parser, main
from pipelines.plan import check_settings
from pipelines.screen_config import ScreenConfig, resolve_config
from preprocessing.bias_field import N4Settings, correct_bias_field
from preprocessing.cohort import SubjectSpec, check_store, preprocess_cohort
from preprocessing.io import load_volume, save_volume
from preprocessing.settings import PreprocessSettings
from preprocessing.transforms import BiasFieldCorrection, BiasFieldCorrectiond, VolscanPreprocessd
from volumetric.errors import InputFileError, VolscanError

SIZE = 28


def phantom(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A textured ellipsoid 'brain' (three tissue classes at a ~2-voxel scale, a bright spherical
    lesion), a smooth field exp(quadratic) with a ~0.1 log std, and their product."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    brain = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.75) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.normal(size=(n,) * 3), n / 24)
    low, high = np.quantile(texture[brain], [0.3, 0.7])
    image = np.where(texture < low, 40.0, np.where(texture < high, 70.0, 100.0))
    lesion = (x - 0.3) ** 2 + (y + 0.2) ** 2 + (z - 0.1) ** 2 < 0.12**2
    image[lesion] = 160.0
    image = np.where(brain, ndimage.gaussian_filter(np.where(brain, image, 0.0), 0.7), 0.0).astype(np.float32)
    field = np.exp(0.25 * x + 0.2 * y**2 - 0.15 * z + 0.1 * x * z).astype(np.float32)
    return {"image": image, "field": field, "biased": image * field, "brain": brain, "lesion": lesion}


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    return phantom(64)


def test_n4_removes_a_known_smooth_field_and_keeps_a_lesion(scene):
    """Against the plain reference (the biased image divided by the true field): the log-ratio std
    inside the brain drops >= 3x, and the lesion's contrast to a shell around it stays within 10 %."""
    biased, brain, lesion = scene["biased"], scene["brain"], scene["lesion"]
    corrected = correct_bias_field(biased, brain, (2.5, 2.5, 2.5))
    reference = biased / scene["field"]
    assert corrected.dtype == np.float32 and corrected.shape == biased.shape
    inner = ndimage.binary_erosion(brain, iterations=2)  # away from the partial-volume rim

    def log_std(image):
        return float(np.log(image[inner] / reference[inner]).std())

    assert log_std(biased) > 0.08  # the field is there to remove
    assert log_std(corrected) * 3 <= log_std(biased)
    shell = ndimage.binary_dilation(lesion, iterations=3) & ~ndimage.binary_dilation(lesion, iterations=1) & brain

    def contrast(image):
        return image[lesion].mean() / image[shell].mean()

    assert contrast(corrected) == pytest.approx(contrast(reference), rel=0.1)
    # Geometric mean 1 over the brain: the overall level stays (only the spatial variation goes).
    fit = brain & (biased > 0)
    assert np.exp(np.log(corrected[fit] / biased[fit]).mean()) == pytest.approx(1, abs=1e-3)
    assert np.array_equal(biased, scene["image"] * scene["field"])  # input untouched


def test_settings_validation_mapping_and_cache_keys():
    assert PreprocessSettings().bias_correction == "auto"
    with pytest.raises(VolscanError, match="unknown bias correction 'N4'; choose one of auto, none, n4"):
        PreprocessSettings(bias_correction="N4")
    with pytest.raises(VolscanError, match="preprocess n4 must be N4Settings"):
        PreprocessSettings(n4={"shrink": 2})
    settings = PreprocessSettings.from_mapping({"bias-correction": "n4", "n4": {"iterations": [20, 10], "shrink": 2}})
    assert settings.n4 == N4Settings(shrink=2, iterations=(20, 10)) and settings.n4.iterations == (20, 10)
    for table, message in (({"n4": {"shrnk": 2}}, "config 'preprocess.n4': .*shrnk"),
                           ({"n4": {"iterations": [0]}}, "N4 iterations must be a list of integers >= 1"),
                           ({"n4": {"control_points": 3}}, "N4 control_points must be an integer >= 4"),
                           ({"n4": {"convergence": 0}}, "N4 convergence must be a number > 0"),
                           ({"n4": {"threads": 0}}, "N4 threads must be an integer >= 1"),
                           # N4 options without N4 would do nothing: one line, not silently ignored
                           ({"bias-correction": "none", "n4": {"shrink": 2}}, "^preprocess n4 settings are set but bias_correction is none; "
                                                   "add bias_correction: n4$")):
        with pytest.raises(VolscanError, match=message):
            PreprocessSettings.from_mapping(table)

    def key(s):
        return json.dumps(s.spatial_key("template", "nonzero"), sort_keys=True)

    none, n4 = PreprocessSettings(bias_correction="none"), PreprocessSettings(bias_correction="n4")
    assert len({key(none), key(n4), key(n4.replace(n4=N4Settings(shrink=2)))}) == 3
    with pytest.raises(VolscanError, match="bias_correction is none"):
        n4.replace(n4=N4Settings(threads=2), bias_correction="none")
    assert PreprocessSettings.from_mapping({"n4": {"shrink": 4}}) == PreprocessSettings()  # the defaults
    # "auto": N4 for scans volscan registers or skull-strips (same store as "n4"), none for
    # registered and skull-stripped inputs (same store as "none").
    auto = PreprocessSettings()
    assert auto.n4_applies and key(auto) == key(n4.replace(bias_correction="auto"))
    for registered, stripped, applies in ((True, False, True), (False, True, True), (True, True, False)):
        each = auto.replace(registered=registered, skull_stripped=stripped)
        assert each.n4_applies == applies
        reference = (n4 if applies else none).replace(registered=registered, skull_stripped=stripped)
        assert key(each) == key(reference)
    assert not none.n4_applies and n4.replace(registered=True, skull_stripped=True).n4_applies
    # Without N4 the key is the one from before N4 existed (those stores stay valid).
    assert "bias_correction" not in none.spatial_key("template", "nonzero")
    assert n4.to_dict()["bias_correction"] == "n4" and n4.to_dict()["n4"]["shrink"] == 4


@pytest.fixture(scope="module")
def template_dir(sri24_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    small_template(sri24_dir, folder)
    return folder


def test_non_positive_intensities_are_one_line_naming_the_file(template_dir, tmp_path, capsys):
    """A z-scored-like scan (brain intensities <= 0) cannot be N4-corrected: `volscan preprocess
    --bias-correction n4` stops with one line naming the file and the way out, no traceback."""
    from preprocessing.template import load_template

    template = load_template(template_dir)
    src = tmp_path / "in"
    src.mkdir()
    save_volume(np.where(template.brain_mask, template.brain - template.brain.max() - 1, 0), template.image.affine,
                src / "zscored.nii.gz")
    args = ["preprocess", str(src), "-o", str(tmp_path / "out"), "--template", str(template_dir), "--size", str(SIZE),
            "--registered", "--skull-stripped"]
    assert main([*args, "--bias-correction", "n4"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{src / 'zscored.nii.gz'}: N4 bias correction needs positive MR intensities" in lines[0]
    assert "--bias-correction none" in lines[0]
    assert main(args) == 0  # the same scan without N4 is fine
    with pytest.raises(InputFileError, match="volume: N4 bias correction needs positive"):
        correct_bias_field(-np.ones((8, 8, 8)), np.ones((8, 8, 8), bool))


def test_cli_flag_reaches_the_cubes_and_their_cache_key(template_dir, tmp_path, capsys):
    """`volscan preprocess --bias-correction n4`: the record holds the setting, the spatial cube is
    the N4-corrected one, and the folder made with N4 is stale for a run without it (not silently
    reused)."""
    from preprocessing.template import load_template
    from preprocessing.volume import VolumePreprocessor

    template = load_template(template_dir)
    src = tmp_path / "in"
    src.mkdir()
    shape = template.brain.shape
    ramp = np.exp(0.3 * np.linspace(-1, 1, shape[0]))[:, None, None] * np.ones(shape)
    save_volume(template.brain * ramp, template.image.affine, src / "scan.nii.gz")
    args = ["preprocess", str(src), "-o", str(tmp_path / "out"), "--template", str(template_dir), "--size", str(SIZE),
            "--registered", "--skull-stripped"]
    assert main([*args, "--bias-correction", "n4"]) == 0
    record = json.loads((tmp_path / "out" / "records" / "scan.json").read_text(encoding="utf-8"))
    assert record["settings"]["bias_correction"] == "n4" and record["settings"]["n4"]["shrink"] == 4
    settings = PreprocessSettings(size=SIZE, registered=True, skull_stripped=True)
    plain = VolumePreprocessor(settings, template)(src / "scan.nii.gz")
    spacing = np.linalg.norm(plain.mapping.cube_affine[:3, :3], axis=0)
    expected = correct_bias_field(plain.cube, plain.brain_mask, spacing, N4Settings(), str(src / "scan.nii.gz"))
    # The store keeps cubes as scaled int16: each value within half a step of the float32 cube.
    half_step = np.abs(expected).max() / 65534
    np.testing.assert_allclose(load_volume(tmp_path / "out" / "spatial" / "scan.nii.gz").array, expected,
                               rtol=1e-6, atol=half_step * 1.001)
    capsys.readouterr()
    assert main(args) == 2  # made with N4; asked without: stale, the user decides (--force)
    assert "--force" in capsys.readouterr().err
    # What `volscan score` reports for such a store names the setting that differs.
    spec = [SubjectSpec(src / "scan.nii.gz")]
    check = check_store(spec, tmp_path / "out", settings, template=template)
    assert check.scans == {"scan": "preprocessed with other settings (bias_correction: n4 in the store, none requested)"}
    other = settings.replace(bias_correction="n4", n4=N4Settings(shrink=2))
    check = check_store(spec, tmp_path / "out", other, template=template)
    assert check.scans == {"scan": "preprocessed with other settings (n4.shrink: 4 in the store, 2 requested)"}
    result = preprocess_cohort([SubjectSpec(src / "scan.nii.gz")], tmp_path / "api", settings, template=template,
                               progress=False)
    np.testing.assert_array_equal(result.records[0].load_mask(), plain.brain_mask)


def test_monai_transform_returns_the_type_given_and_equals_the_function(scene):
    image, brain = scene["biased"][::4, ::4, ::4], scene["brain"][::4, ::4, ::4]  # 16³
    quick = N4Settings(iterations=(10, 10))  # equality, not quality
    expected = correct_bias_field(image, brain, (2.0, 3.0, 4.0), quick)
    transform = BiasFieldCorrection(quick, spacing=(2.0, 3.0, 4.0))
    out = transform(image[None].astype(np.float64), brain[None])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, *image.shape)
    np.testing.assert_array_equal(out[0], expected)
    plain = transform(image, brain)  # no channel axis in, none out
    assert plain.shape == image.shape
    np.testing.assert_array_equal(plain, expected)
    tensor = transform(torch.as_tensor(image[None]), torch.as_tensor(brain))
    assert type(tensor) is torch.Tensor and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor[0].numpy(), expected)
    # A MetaTensor: the voxel sizes come from its affine, its metadata stays.
    meta = MetaTensor(torch.as_tensor(image[None]), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])),
                      meta={"filename_or_obj": "scan.nii.gz"})
    item = BiasFieldCorrectiond("image", quick)({"image": meta, "brain_mask": MetaTensor(torch.as_tensor(brain[None]))})
    assert isinstance(item["image"], MetaTensor) and item["image"].meta["filename_or_obj"] == "scan.nii.gz"
    assert float(item["image"].affine[1, 1]) == 3.0
    np.testing.assert_array_equal(item["image"][0].numpy(), expected)
    # Each channel its own field: the second one carries another known field (channel 0's would not fit).
    x = np.linspace(-1, 1, image.shape[0], dtype=np.float32)[:, None, None]
    other = (scene["image"][::4, ::4, ::4] * np.exp(-0.4 * x + 0.3 * x**2)).astype(np.float32)
    two = transform(np.stack([image, other]), brain)
    np.testing.assert_array_equal(two[0], expected)
    np.testing.assert_array_equal(two[1], correct_bias_field(other, brain, (2.0, 3.0, 4.0), quick))
    fit = brain & (image > 0)
    assert np.abs(two[1][fit] - other[fit] * expected[fit] / image[fit]).max() > 1  # channel 0's field would not do
    with pytest.raises(VolscanError, match="brain mask shape"):
        transform(image, brain[1:])
    with pytest.raises(InputFileError, match="^scan.nii.gz: N4 bias correction needs positive"):
        BiasFieldCorrection()(MetaTensor(-torch.ones((1, 8, 8, 8)), meta={"filename_or_obj": "scan.nii.gz"}),
                              np.ones((8, 8, 8), bool))


def test_whole_chain_transform_takes_the_setting(template_dir, tmp_path):
    """`VolscanPreprocessd` with `bias_correction="n4"`: `keys[0]` comes out as `VolumePreprocessor`
    makes it (N4 in the cube), a second image key gets its own N4 field, a label stays a label."""
    from preprocessing.template import load_template
    from preprocessing.volume import VolumePreprocessor

    template = load_template(template_dir)
    shape = template.brain.shape
    ramp = np.exp(0.3 * np.linspace(-1, 1, shape[0]))[:, None, None] * np.ones(shape, np.float32)
    affine = torch.as_tensor(template.image.affine)
    settings = PreprocessSettings(size=SIZE, registered=True, skull_stripped=True, bias_correction="n4",
                                  n4=N4Settings(iterations=(10, 10)))  # the same steps, not their quality
    chain = VolscanPreprocessd(["t1", "t2", "label"], settings, template, mode=("bilinear", "bilinear", "nearest"),
                               image_keys=["t1", "t2"])
    label = (template.brain_mask & (np.arange(shape[0]) < shape[0] // 2)[:, None, None]).astype(np.float32)
    item = chain({key: MetaTensor(torch.as_tensor(array[None]), affine=affine)
                  for key, array in (("t1", template.brain * ramp), ("t2", 2 * template.brain * ramp), ("label", label))})
    t1 = load_volume(save_volume(template.brain * ramp, template.image.affine, tmp_path / "t1.nii.gz"))
    cube = VolumePreprocessor(settings, template)(t1)
    plain = VolumePreprocessor(settings.replace(bias_correction="none", n4=N4Settings()), template)(t1).cube
    assert np.abs(cube.cube - plain)[cube.brain_mask].max() > 0.02 * plain.max()  # N4 did change the cube
    np.testing.assert_allclose(item["t1"][0].numpy(), cube.cube, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(item["t2"][0].numpy(), 2 * cube.cube, rtol=1e-3, atol=1e-2)
    assert set(np.unique(item["label"].numpy())) <= {0.0, 1.0}
    assert chain.inverse(item)["t2"].shape[1:] == shape


def test_screen_flag_and_config_reach_the_preprocess_settings(tmp_path):
    """`--bias-correction` on `volscan screen` (and extract/score, which share the flags) and in a
    config file (top level or the `preprocess` table with an `n4` table); unset keeps the default."""
    parser, _ = build_parser("screen")
    args = parser.parse_args(["screen", "in", "-o", "out", "--bias-correction", "n4"])
    from pipelines.commands.screen import OVERRIDES

    config = resolve_config(None, **{name: getattr(args, name) for name in OVERRIDES})
    assert config.bias_correction == "n4" and config.preprocess_settings().bias_correction == "n4"
    assert resolve_config(None).preprocess_settings().bias_correction == "auto"
    path = tmp_path / "c.toml"
    path.write_text('[preprocess]\nbias_correction = "n4"\nn4 = {shrink = 2, iterations = [30, 20]}\n', encoding="utf-8")
    from_file = resolve_config(path).preprocess_settings()
    assert from_file.bias_correction == "n4" and from_file.n4 == N4Settings(shrink=2, iterations=(30, 20))
    # The flag wins; `--bias-correction none` also drops the table's n4 options (no error for them).
    assert resolve_config(path, bias_correction="none").preprocess_settings() == PreprocessSettings(bias_correction="none")
    only_n4 = tmp_path / "n4.yaml"
    only_n4.write_text("preprocess: {n4: {shrink: 2}}\n", encoding="utf-8")  # "auto": used wherever N4 applies
    assert resolve_config(only_n4).preprocess_settings().n4 == N4Settings(shrink=2)
    only_n4.write_text("preprocess: {bias_correction: none, n4: {shrink: 2}}\n", encoding="utf-8")
    with pytest.raises(VolscanError, match="^preprocess n4 settings are set but bias_correction is none"):
        resolve_config(only_n4).preprocess_settings()
    top = tmp_path / "top.yaml"
    top.write_text("bias-correction: n4\n", encoding="utf-8")
    assert resolve_config(top).preprocess_settings().bias_correction == "n4"
    with pytest.raises(VolscanError, match="unknown bias correction 'N4'; choose one of auto, none, n4"):
        check_settings(ScreenConfig(bias_correction="N4"))  # checked once, by PreprocessSettings
    preprocess_args = build_parser("preprocess")[0].parse_args(["preprocess", "in", "-o", "out"])
    assert preprocess_args.bias_correction is None  # unset: PreprocessSettings' default applies
    for command in ("extract", "score"):  # -o: the cache (extract), the output folder (score)
        parsed = build_parser(command)[0].parse_args([command, "in", "-o", "out", "--bias-correction", "n4"])
        assert parsed.bias_correction == "n4"


def test_n4_output_does_not_depend_on_the_machine_thread_count(scene):
    """One ITK thread by default (`N4Settings.threads`): reruns are bit-identical whatever the global
    ITK thread count is, which is restored afterwards; a second thread changes the output."""
    import SimpleITK as sitk

    image, brain = scene["biased"], scene["brain"]
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        single = correct_bias_field(image, brain)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)
        np.testing.assert_array_equal(correct_bias_field(image, brain), single)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 4
        np.testing.assert_array_equal(correct_bias_field(image, brain), single)  # rerun
        assert not np.array_equal(correct_bias_field(image, brain, settings=N4Settings(threads=4)), single)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def test_n4_gets_its_own_cohort_store(tmp_path):
    """Screens with and without N4 (or with other n4 options) never share a preprocessing store;
    "auto" shares the store of what it resolves to."""
    from pipelines.cache_locations import cohort_folder
    from pipelines.subjects import Subject

    subjects = [Subject(id=f"s{i}", image=save_volume(np.full((8, 8, 8), i + 1.0, np.float32), np.eye(4),
                                                      tmp_path / f"s{i}.nii.gz")) for i in range(3)]

    def folder(**settings):
        return cohort_folder(subjects, "3d", ScreenConfig(**settings).preprocess_settings(), None, tmp_path)

    folders = {bias: folder(bias_correction=bias) for bias in ("none", "n4")}
    other = folder(bias_correction="n4", preprocess={"n4": {"shrink": 2}})
    assert len({folders["none"], folders["n4"], other}) == 3
    # The default "auto": N4's store for raw scans, the store without N4 for registered, skull-stripped ones.
    assert folder() == folders["n4"]
    assert folder(registered=True, skull_stripped=True) == folders["none"]
