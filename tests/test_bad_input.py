"""Hostile input to every `volscan` command: one clear line, no traceback, nothing lost.

Each case runs a command in-process through `pipelines.cli.main` and asserts: the exit code,
exactly one message line naming the file or option and the problem, no traceback, no output
folder (or the previous one untouched) and every input file byte-identical afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from test_screen import screen_setup


def _tree_hashes(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under `roots` (the inputs a command must not touch)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _one_error_line(err: str) -> str:
    """The single message line of stderr (progress-bar frames and log lines dropped)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)
    lines = [line for line in re.split(r"[\r\n]+", text) if line.strip() and "%|" not in line
             and not re.search(r"/s\]\s*$", line) and not line.startswith(("WARNING ", "INFO ", "DEBUG "))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    return screen_setup(tmp_path_factory.mktemp("bad-input"), tiny_vit_spec)


def _cohort(base: dict, folder: Path, count: int = 3) -> Path:
    """A phantom-like cohort folder: folder/images/<3 scans>."""
    images = folder / "images"
    images.mkdir(parents=True)
    for path in sorted(base["images"].iterdir())[:count]:
        shutil.copy(path, images / path.name)
    return images


# ---------------------------------------------------------------- data loss (regressions)

def test_preprocess_into_the_parent_of_its_input_is_refused(base: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """`volscan preprocess cohort/images -o cohort` used to overwrite every raw input with its cube."""
    images = _cohort(base, tmp_path / "cohort")
    before = _tree_hashes(tmp_path / "cohort")
    capsys.readouterr()
    code = main(["preprocess", str(images), "-o", str(tmp_path / "cohort"), "--template", str(base["template"]),
                 "--registered", "--skull-stripped", "--size", "28"])
    err = capsys.readouterr().err
    assert _tree_hashes(tmp_path / "cohort") == before
    assert code == 2
    line = _one_error_line(err)
    assert str(tmp_path / "cohort") in line and "input" in line


def test_force_never_deletes_a_folder_that_merely_holds_report_json(base: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """`volscan screen ... -o thesis --force` used to delete a user's folder holding a report.json."""
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "report.json").write_text('{"chapter": 3}', encoding="utf-8")
    (thesis / "thesis.tex").write_text("years of work", encoding="utf-8")
    before = _tree_hashes(thesis)
    capsys.readouterr()
    code = main(["screen", str(base["images"]), "-o", str(thesis), "--force", "--config", str(base["config"]),
                 "--template", str(base["template"]), "--registered", "--skull-stripped"])
    err = capsys.readouterr().err
    assert _tree_hashes(thesis) == before
    assert code == 2
    line = _one_error_line(err)
    assert str(thesis) in line and "not a previous volscan" in line


# ---------------------------------------------------------------- the table

@dataclass
class Run:
    """One hostile invocation: argv, words the error line must hold, files that must stay
    byte-identical, the output that must not appear (or must stay as it was) and the exit code."""

    argv: list[str]
    needles: tuple[str, ...]
    inputs: tuple[Path, ...]
    out: Path | None = None
    code: int = 2


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _header_bomb(path: Path) -> Path:
    """A .nii whose header claims 30000^3 float32 voxels followed by 1 kB of data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((30000, 30000, 30000))
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    return path


def _png_bomb(path: Path) -> Path:
    """A 100000 x 100000 one-bit PNG of a few hundred bytes (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _images_2d(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


class Ctx:
    """Per-case helpers over the module fixture `base` and the case's own `tmp`."""

    def __init__(self, base: dict, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.base, self.tmp, self.monkeypatch = base, tmp, monkeypatch

    def inputs(self, count: int = 3) -> Path:
        return _cohort(self.base, self.tmp / "cohort", count)

    def screen(self, inputs: Path, out: Path, *extra: str, config: Path | None = None,
               own_cache: bool = True) -> list[str]:
        """argv of a screen run; `own_cache=False` shares the module's cache (finished run's cubes/tokens)."""
        cache = ["--cache", str(self.tmp / "cache")] if own_cache else []
        return ["screen", str(inputs), "-o", str(out), "--config", str(config or self.base["config"]),
                "--template", str(self.base["template"]), "--registered", "--skull-stripped", *cache, *extra]

    def config(self, **extra: object) -> Path:
        text = self.base["config"].read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.split(":")[0] not in extra]
        lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
        path = self.tmp / "config.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def folder_with(self, name: str, **files: str) -> Path:
        folder = self.tmp / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file.replace("__", ".")).write_text(text, encoding="utf-8")
        return folder

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.base["run"], self.tmp / "run"))

    def preprocess(self, inputs: Path, out: Path, *extra: str) -> list[str]:
        return ["preprocess", str(inputs), "-o", str(out), "--template", str(self.base["template"]),
                "--registered", "--skull-stripped", "--size", "28", *extra]


def _screen_out_equal_input(c: Ctx) -> Run:
    inputs = c.inputs()
    return Run(c.screen(inputs, inputs, "--force"), ("would replace the input",), (inputs,))


def _screen_out_parent(c: Ctx) -> Run:
    inputs = c.inputs()
    return Run(c.screen(inputs, inputs.parent, "--force"), ("would replace the input",), (inputs.parent,))


def _screen_out_child(c: Ctx) -> Run:
    inputs = c.inputs()
    return Run(c.screen(inputs, inputs / "run"), ("inside the input folder",), (inputs,), inputs / "run")


def _screen_out_in_labels(c: Ctx) -> Run:
    inputs = c.inputs()
    labels = Path(shutil.copytree(c.base["labels"], c.tmp / "labels"))
    return Run(c.screen(inputs, labels / "run", "--labels", str(labels)), ("inside the input folder",),
               (inputs, labels), labels / "run")


def _screen_force_report_json(c: Ctx) -> Run:
    thesis = c.folder_with("thesis", report__json='{"chapter": 3}', thesis__tex="years of work")
    return Run(c.screen(c.inputs(), thesis, "--force"), ("not a previous volscan screen output",),
               (c.tmp / "cohort", thesis))


def _screen_force_other_command(c: Ctx) -> Run:
    cohort = c.folder_with("phantom", images__txt="x")
    (cohort / "volscan-run.json").write_text('{"format": "volscan-run/1", "command": "phantom"}', encoding="utf-8")
    return Run(c.screen(c.inputs(), cohort, "--force"), ("volscan phantom output",), (c.tmp / "cohort", cohort))


def _screen_force_forged_marker(c: Ctx) -> Run:
    folder = c.folder_with("mine", volscan__run__json='{"command": "screen"}', notes__txt="x")
    (folder / "volscan.run.json").rename(folder / "volscan-run.json")
    return Run(c.screen(c.inputs(), folder, "--force"), ("no valid volscan-run.json",), (c.tmp / "cohort", folder))


def _screen_out_exists(c: Ctx) -> Run:
    out = c.folder_with("out", a__txt="x")
    return Run(c.screen(c.inputs(), out), ("already exists", "--force"), (c.tmp / "cohort", out))


def _screen_out_is_file(c: Ctx) -> Run:
    out = c.tmp / "out.txt"
    out.write_text("x", encoding="utf-8")
    return Run(c.screen(c.inputs(), out, "--force"), ("not a folder",), (c.tmp / "cohort", out))


def _screen_out_under_file(c: Ctx) -> Run:
    blocker = c.tmp / "blocker"
    blocker.write_text("x", encoding="utf-8")
    return Run(c.screen(c.inputs(), blocker / "out"), ("not a folder",), (c.tmp / "cohort", blocker))


def _screen_out_read_only(c: Ctx) -> Run:
    return Run(c.screen(c.inputs(), Path("/proc/volscan-out")), ("/proc", "not writable"), (c.tmp / "cohort",))


def _screen_header_bomb(c: Ctx) -> Run:
    inputs = c.inputs(2)
    _header_bomb(inputs / "zz_bomb.nii")
    return Run(c.screen(inputs, c.tmp / "out"), ("zz_bomb.nii", "header claims 30000x30000x30000"), (inputs,),
               c.tmp / "out")


def _screen_tiny_volume(c: Ctx) -> Run:
    inputs = c.inputs()
    _nifti(inputs / "tiny.nii.gz", np.ones((5, 5, 5), np.float32))
    return Run(c.screen(inputs, c.tmp / "out"), ("tiny.nii.gz", "too small"), (inputs,), c.tmp / "out")


def _screen_complex(c: Ctx) -> Run:
    inputs = c.inputs()
    _nifti(inputs / "cplx.nii.gz", np.ones((16, 16, 16), np.complex64))
    return Run(c.screen(inputs, c.tmp / "out"), ("cplx.nii.gz", "complex"), (inputs,), c.tmp / "out")


def _screen_4d(c: Ctx) -> Run:
    inputs = c.inputs()
    _nifti(inputs / "fmri.nii.gz", np.ones((16, 16, 16, 3), np.float32))
    return Run(c.screen(inputs, c.tmp / "out"), ("fmri.nii.gz", "3D"), (inputs,), c.tmp / "out")


def _screen_corrupt(c: Ctx) -> Run:
    inputs = c.inputs()
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti at all")
    return Run(c.screen(inputs, c.tmp / "out"), ("broken.nii.gz", "not a readable NIfTI"), (inputs,), c.tmp / "out")


def _screen_two_inputs_codegraph(c: Ctx) -> Run:
    inputs = c.inputs(2)
    return Run(c.screen(inputs, c.tmp / "out"), ("codegraph", "at least 3"), (inputs,), c.tmp / "out")


def _screen_seed_negative(c: Ctx) -> Run:
    return Run(c.screen(c.inputs(), c.tmp / "out", "--seed", "-1"), ("seed", "between 0 and"), (c.tmp / "cohort",),
               c.tmp / "out")


def _screen_seed_huge(c: Ctx) -> Run:
    return Run(c.screen(c.inputs(), c.tmp / "out", "--seed", str(2**70)), ("seed", str(2**70)), (c.tmp / "cohort",),
               c.tmp / "out")


def _screen_histogram_bins(c: Ctx) -> Run:
    return Run(c.screen(c.inputs(), c.tmp / "out", "--histogram-bins", str(10**11)), ("histogram-bins", str(10**11)),
               (c.tmp / "cohort",), c.tmp / "out")


def _screen_histogram_bins_config(c: Ctx) -> Run:
    config = c.config(**{"histogram-bins": 1e11})
    return Run(c.screen(c.inputs(), c.tmp / "out", config=config), ("histogram", "integer"),
               (c.tmp / "cohort", config), c.tmp / "out")


def _screen_depth_negative(c: Ctx) -> Run:
    config = c.config(backbone_kwargs={"depth": -1, "embed_dim": 48, "num_heads": 2})
    return Run(c.screen(c.inputs(), c.tmp / "out", config=config), ("backbone_kwargs depth",),
               (c.tmp / "cohort", config), c.tmp / "out")


def _screen_width_heads(c: Ctx) -> Run:
    config = c.config(backbone_kwargs={"depth": 2, "embed_dim": 50, "num_heads": 3})
    return Run(c.screen(c.inputs(), c.tmp / "out", config=config), ("embed_dim 50", "not divisible", "num_heads 3"),
               (c.tmp / "cohort", config), c.tmp / "out")


def _weights_case(c: Ctx, weights: Path, *needles: str) -> Run:
    return Run(c.screen(c.inputs(), c.tmp / "out", "--weights", str(weights)), (str(weights), *needles),
               (c.tmp / "cohort", weights), c.tmp / "out")


def _screen_garbage_weights(c: Ctx) -> Run:
    return _weights_case(c, c.base["weights"]["garbage"], "cannot load")


def _screen_truncated_weights(c: Ctx) -> Run:
    return _weights_case(c, c.base["weights"]["truncated"], "cannot load", "not a complete safetensors file")


def _screen_mismatched_weights(c: Ctx) -> Run:
    return _weights_case(c, c.base["weights"]["deeper"], "unexpected key(s)", "blocks.3")


def _screen_missing_weights(c: Ctx) -> Run:
    return _weights_case(c, c.tmp / "nowhere.safetensors", "weights file not found")


def _screen_no_template(c: Ctx) -> Run:
    argv = c.screen(c.inputs(), c.tmp / "out")
    argv[argv.index("--template") + 1] = str(c.tmp / "no-template")
    return Run(argv, (str(c.tmp / "no-template"), "not a template folder"), (c.tmp / "cohort",), c.tmp / "out")


def _screen_yaml_error(c: Ctx) -> Run:
    config = c.tmp / "bad.yaml"
    config.write_text("size: 28\nlayers: [1, 2\nseed: 3\n", encoding="utf-8")
    return Run(c.screen(c.inputs(), c.tmp / "out", config=config), (str(config), "line ", "column "),
               (c.tmp / "cohort", config), c.tmp / "out")


def _screen_unknown_setting(c: Ctx) -> Run:
    config = c.config(methdo="musc")
    return Run(c.screen(c.inputs(), c.tmp / "out", config=config), (str(config), "unknown setting 'methdo'"),
               (c.tmp / "cohort", config), c.tmp / "out")


def _screen_bad_cutoff(c: Ctx) -> Run:
    config = c.config(preprocess={"cutoff": [0.5, 0.6]})
    return Run(c.screen(c.inputs(), c.tmp / "out", config=config), ("cutoff", "0.5"),
               (c.tmp / "cohort", config), c.tmp / "out")


def _screen_label_grid(c: Ctx) -> Run:
    inputs = c.inputs()
    labels = c.tmp / "labels"
    _nifti(labels / "case00.nii.gz", np.zeros((20, 20, 20), np.uint8))
    return Run(c.screen(inputs, c.tmp / "out", "--labels", str(labels)), (str(labels / "case00.nii.gz"), "match"),
               (inputs, labels), c.tmp / "out")


def _screen_mixed_kinds(c: Ctx) -> Run:
    inputs = c.inputs()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(inputs / "photo.png")
    return Run(c.screen(inputs, c.tmp / "out"), ("mix", "separate runs"), (inputs,), c.tmp / "out")


def _screen_2d(c: Ctx, bad: str, *needles: str) -> Run:
    inputs = _images_2d(c.tmp / "pictures")
    argv = ["screen", str(inputs), "-o", str(c.tmp / "out"), "--config", str(c.base["config"]),
            "--cache", str(c.tmp / "cache")]
    return Run(argv, (str(inputs / bad), *needles), (inputs,), c.tmp / "out")


def _screen_2d_nan(c: Ctx) -> Run:
    run = _screen_2d(c, "nan.tiff", "NaN/Inf pixels")
    pixels = np.ones((40, 40), np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode="F").save(c.tmp / "pictures" / "nan.tiff")
    return run


def _screen_2d_multipage(c: Ctx) -> Run:
    run = _screen_2d(c, "stack.tiff", "2 pages")
    pages = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (10, 200)]
    pages[0].save(c.tmp / "pictures" / "stack.tiff", save_all=True, append_images=pages[1:])
    return run


def _screen_2d_bomb(c: Ctx) -> Run:
    run = _screen_2d(c, "bomb.png", "decompression-bomb")
    _png_bomb(c.tmp / "pictures" / "bomb.png")
    return run


def _screen_disk_full(c: Ctx) -> Run:
    """ENOSPC while the run is written: one line naming the file under OUT, no hidden leftovers."""
    import pipelines.run_folder

    def full(path: Path, payload: bytes) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    c.monkeypatch.setattr(pipelines.run_folder, "atomic_write_bytes", full)
    run = _screen_2d(c, "", "No space left on device")  # 2D: a whole run in a second
    run.needles = (f"error: {run.out}/", *run.needles[1:])
    return run


def _interrupted_while_writing(c: Ctx, interrupt: Callable[[], None], code: int, word: str) -> Run:
    """A finished screen interrupted as it commits: exit `code`, one line, no output, no .partial."""
    import pipelines.run_folder

    def marker(folder: Path, command: str) -> Path:
        interrupt()
        raise AssertionError("not interrupted")

    c.monkeypatch.setattr(pipelines.run_folder, "write_run_marker", marker)
    run = _screen_2d(c, "", word, "partial outputs removed")  # 2D: a whole run in a second
    run.needles, run.code = run.needles[1:], code
    return run


def _screen_ctrl_c(c: Ctx) -> Run:
    def ctrl_c() -> None:
        raise KeyboardInterrupt

    return _interrupted_while_writing(c, ctrl_c, 130, "interrupted")


def _screen_sigterm(c: Ctx) -> Run:
    return _interrupted_while_writing(c, lambda: os.kill(os.getpid(), signal.SIGTERM), 143, "terminated (SIGTERM)")


def _screen_hub_unreachable(c: Ctx) -> Run:
    c.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c.monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time
    config = c.config(weights=None)
    return Run(c.screen(c.inputs(), c.tmp / "out", config=config), ("Hugging Face hub", "--weights PATH"),
               (c.tmp / "cohort", config), c.tmp / "out")


def _preprocess_parent(c: Ctx) -> Run:
    inputs = c.inputs()
    return Run(c.preprocess(inputs, inputs.parent), ("would replace the input",), (inputs.parent,))


def _preprocess_equal(c: Ctx) -> Run:
    inputs = c.inputs()
    return Run(c.preprocess(inputs, inputs), ("would replace the input",), (inputs,))


def _preprocess_child(c: Ctx) -> Run:
    inputs = c.inputs()
    return Run(c.preprocess(inputs, inputs / "prep"), ("inside the input folder",), (inputs,), inputs / "prep")


def _preprocess_out_file(c: Ctx) -> Run:
    out = c.tmp / "out.nii.gz"
    out.write_bytes(b"x")
    return Run(c.preprocess(c.inputs(), out), ("not a folder",), (c.tmp / "cohort", out))


def _preprocess_read_only(c: Ctx) -> Run:
    return Run(c.preprocess(c.inputs(), Path("/proc/volscan-prep")), ("not writable",), (c.tmp / "cohort",))


def _preprocess_foreign_folder(c: Ctx) -> Run:
    out = c.folder_with("mydata", notes__txt="mine")
    (out / "images").mkdir()
    (out / "images" / "case00.nii.gz").write_bytes(b"precious")
    return Run(c.preprocess(c.inputs(), out, "--force"), ("not a previous volscan preprocess output",),
               (c.tmp / "cohort", out))


def _preprocess_disk_full(c: Ctx) -> Run:
    """ENOSPC at the first cube: one line naming the file, and the new OUT is not left behind."""
    import preprocessing.io

    def full(path: Path, suffix: str = ".tmp") -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    c.monkeypatch.setattr(preprocessing.io, "atomic_path", full)
    out = c.tmp / "prep"
    return Run(c.preprocess(c.inputs(), out), (f"error: {out}/", ".nii.gz", "No space left on device"),
               (c.tmp / "cohort",), out)


def _preprocess_cutoff(c: Ctx) -> Run:
    return Run(c.preprocess(c.inputs(), c.tmp / "prep", "--cutoff", "0.5", "0.6"), ("cutoff", "0.5"),
               (c.tmp / "cohort",), c.tmp / "prep")


def _preprocess_workers(c: Ctx) -> Run:
    return Run(c.preprocess(c.inputs(), c.tmp / "prep", "--workers", "0"), ("--workers", "got 0"),
               (c.tmp / "cohort",), c.tmp / "prep")


def _preprocess_header_bomb(c: Ctx) -> Run:
    inputs = c.inputs(2)
    _header_bomb(inputs / "zz_bomb.nii")
    return Run(c.preprocess(inputs, c.tmp / "prep"), ("zz_bomb.nii", "header claims"), (inputs,), c.tmp / "prep")


def _preprocess_tiny(c: Ctx) -> Run:
    inputs = c.inputs(2)
    _nifti(inputs / "tiny.nii.gz", np.ones((5, 5, 5), np.float32))
    return Run(c.preprocess(inputs, c.tmp / "prep"), ("tiny.nii.gz", "too small"), (inputs,), c.tmp / "prep")


def _preprocess_complex(c: Ctx) -> Run:
    inputs = c.inputs(2)
    _nifti(inputs / "cplx.nii.gz", np.ones((16, 16, 16), np.complex64))
    return Run(c.preprocess(inputs, c.tmp / "prep"), ("cplx.nii.gz", "complex"), (inputs,), c.tmp / "prep")


def _evaluate(c: Ctx, run: Path, *needles: str, extra: tuple[str, ...] = ()) -> Run:
    return Run(["evaluate", str(run), "--labels", str(c.base["labels"]), *extra], needles, (run, c.base["labels"]))


def _evaluate_truncated_elements(c: Ctx) -> Run:
    run = c.run_copy()
    data = (run / "elements.npz").read_bytes()
    (run / "elements.npz").write_bytes(data[: len(data) // 2])
    return _evaluate(c, run, str(run / "elements.npz"), "checksum mismatch")


def _evaluate_edited_mapping(c: Ctx) -> Run:
    run = c.run_copy()
    mapping = sorted((run / "mappings").iterdir())[0]
    mapping.write_text(mapping.read_text(encoding="utf-8").replace("1.0", "1.5", 1), encoding="utf-8")
    return _evaluate(c, run, str(mapping), "checksum mismatch")


def _evaluate_not_a_run(c: Ctx) -> Run:
    folder = c.folder_with("notarun", report__json="{}")
    return _evaluate(c, folder, "not a finished volscan screen output")


def _evaluate_bins(c: Ctx) -> Run:
    return _evaluate(c, c.run_copy(), "--histogram-bins", str(10**11), extra=("--histogram-bins", str(10**11)))


def _phantom_force_foreign(c: Ctx) -> Run:
    out = c.folder_with("cohort", cohort__json="{}", notes__txt="mine")
    return Run(["phantom", "-o", str(out), "--force", "--normal", "2", "--lesion", "1", "--consistent", "0"],
               ("not a previous volscan phantom output",), (out,))


def _phantom_out_file(c: Ctx) -> Run:
    out = c.tmp / "cohort.txt"
    out.write_text("x", encoding="utf-8")
    return Run(["phantom", "-o", str(out), "--force"], ("not a folder",), (out,))


def _demo_force_foreign(c: Ctx) -> Run:
    out = c.folder_with("demo", cohort__json="{}", notes__txt="mine")
    return Run(["demo", "-o", str(out), "--force"], ("not a previous volscan demo output",), (out,))


def _demo_exists(c: Ctx) -> Run:
    out = c.folder_with("demo", notes__txt="mine")
    return Run(["demo", "-o", str(out)], ("already exists",), (out,))


def _reproduce(c: Ctx, out: Path, brats: Path, ixi: Path, *needles: str) -> Run:
    return Run(["reproduce", "brats-mets-ixi", "--brats", str(brats), "--ixi", str(ixi), "-o", str(out),
                "--weights", "random"], needles, (brats, ixi))


def _reproduce_inside_brats(c: Ctx) -> Run:
    brats, ixi = c.folder_with("brats", a__txt="x"), c.folder_with("ixi", b__txt="y")
    run = _reproduce(c, brats / "out", brats, ixi, "inside the input folder")
    run.out = brats / "out"
    return run


def _reproduce_equal_ixi(c: Ctx) -> Run:
    brats, ixi = c.folder_with("brats", a__txt="x"), c.folder_with("ixi", b__txt="y")
    return _reproduce(c, ixi, brats, ixi, "would replace the input")


def _template_fetch_unreachable(c: Ctx) -> Run:
    url = f"file://{c.tmp}/sri24.zip"
    return Run(["template", "fetch", "--url", url, "--dest", str(c.tmp / "dest")], (url, "download failed"), (),
               c.tmp / "dest")


def _preprocess_missing_landmarks(c: Ctx) -> Run:
    landmarks = c.tmp / "landmarks.npy"
    return Run(c.preprocess(c.inputs(), c.tmp / "prep", "--landmarks", str(landmarks)), (str(landmarks),),
               (c.tmp / "cohort",), c.tmp / "prep")


def _template_missing(c: Ctx) -> Run:
    return Run(["template", "path", "--template", str(c.tmp / "nope")], (str(c.tmp / "nope"), "not a template folder"),
               ())


def _template_junk_folder(c: Ctx) -> Run:
    folder = c.folder_with("junk", readme__txt="x")
    return Run(["template", "path", "--template", str(folder)], (str(folder), "not a template folder"), (folder,))


CASES = {name[1:]: fn for name, fn in globals().items()
         if name.startswith(("_screen_", "_preprocess_", "_evaluate_", "_phantom_", "_demo_", "_reproduce_",
                             "_template_")) and name not in ("_screen_2d",) and callable(fn)}


def test_the_table_has_every_command_and_enough_cases() -> None:
    commands = {name.split("_")[0] for name in CASES}
    assert commands == {"screen", "preprocess", "evaluate", "phantom", "demo", "reproduce", "template"}
    assert len(CASES) >= 40


@pytest.fixture(scope="module")
def finished(base: dict, tiny_vit_spec: dict) -> dict:
    """`base` with `images` narrowed to three scans, a finished labelled screen run of them (for
    evaluate; its cache is the config's) and weights files (good and bad)."""
    from volumetric.backbones import create_backbone, save_backbone_weights

    images = _cohort(base, base["root"] / "small")  # three scans keep the fixture quick
    run = base["root"] / "run"
    assert main(["screen", str(images), "-o", str(run), "--config", str(base["config"]), "--labels",
                 str(base["labels"]), "--template", str(base["template"]), "--registered", "--skull-stripped"]) == 0
    spec = dict(tiny_vit_spec)
    name = spec.pop("name")
    weights = base["root"] / "weights"
    weights.mkdir()
    deeper = create_backbone(name, "random", **dict(spec, depth=spec["depth"] + 1))
    save_backbone_weights(deeper, weights / "deeper.safetensors")
    good = create_backbone(name, "random", **spec)
    save_backbone_weights(good, weights / "good.safetensors")
    (weights / "truncated.safetensors").write_bytes((weights / "good.safetensors").read_bytes()[:4000])
    (weights / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(2000))
    files = {"deeper": weights / "deeper.safetensors", "truncated": weights / "truncated.safetensors",
             "garbage": weights / "garbage.pth"}
    return dict(base, images=images, run=run, weights=files)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case: str, finished: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    check_refused(CASES[case](Ctx(finished, tmp_path, monkeypatch)), capsys)


def check_refused(run: Run, capsys: pytest.CaptureFixture) -> str:
    """Run `run.argv` in-process; assert its exit code, one error line holding every needle, no
    traceback, inputs byte-identical and no new output (hidden .partial included). The line."""
    out_existed = run.out is not None and run.out.exists()
    before = _tree_hashes(*run.inputs)
    capsys.readouterr()
    code = main(run.argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    line = _one_error_line(captured.err)
    assert code == run.code, line
    assert line.startswith(f"volscan {run.argv[0]}: " + ("error: " if code == 2 else "")), line
    for needle in run.needles:
        assert needle in line, (needle, line)
    assert _tree_hashes(*run.inputs) == before
    if run.out is not None and not out_existed:
        assert not run.out.exists()
        assert not list(run.out.parent.glob(f".{run.out.name}.*"))  # no hidden .partial left
    return line


# ---------------------------------------------------------------- outside the table

# The run waits before it writes report.html (in its hidden temporary folder), so that a signal
# sent once the owner file is written always finds it running: cached tokens make the rest of a
# three-scan screen fast enough to finish first on a loaded machine.
_SCREEN_HELD_BEFORE_REPORT = """
import sys, time
import pipelines.report_build as report_build
real = report_build.report_html
def held(*args, **kwargs):
    time.sleep(600)
    return real(*args, **kwargs)
report_build.report_html = held
from pipelines.cli import main
sys.exit(main())
"""


def _screen_writing(finished: dict, tmp_path: Path, out: Path) -> tuple[list[str], subprocess.Popen]:
    """(argv, process) of a real `volscan screen` into `out`, once it has started writing its
    hidden temporary folder (owner file included) and is still running."""
    argv = Ctx(finished, tmp_path, pytest.MonkeyPatch()).screen(finished["images"], out, own_cache=False)
    proc = subprocess.Popen([sys.executable, "-c", _SCREEN_HELD_BEFORE_REPORT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    # The owner file is created, then written: wait until it holds its content, not only exists.
    def owner_written() -> bool:
        try:
            return any(p.stat().st_size for p in out.parent.glob(f".{out.name}.partial-*/*.json"))
        except FileNotFoundError:  # the folder moved on between the listing and the look
            return False

    while not owner_written() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()  # the run had started writing and was still going
    return argv, proc


def test_sigterm_from_outside_cleans_up_and_exits_143(finished: dict, tmp_path: Path) -> None:
    """SIGTERM (timeout, Slurm, Docker) to a real `volscan screen` process mid-run: exit 143,
    one line, no output folder and no hidden .partial folder left behind."""
    out = tmp_path / "out"
    _, proc = _screen_writing(finished, tmp_path, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert _one_error_line(err) == "volscan screen: terminated (SIGTERM); partial outputs removed"
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_kill_9_leaves_nothing_that_looks_finished_and_the_next_run_cleans_up(finished: dict, tmp_path: Path) -> None:
    """`kill -9` mid-run: no OUT, only the hidden temporary folder, owned by the dead process
    (volscan-partial.json, no run marker). The next run into OUT removes it, and leaves a
    hidden folder volscan did not mark and one of a live process alone."""
    from pipelines.run_folder import PARTIAL_MARKER, RUN_MARKER

    out = tmp_path / "out"
    argv, proc = _screen_writing(finished, tmp_path, out)
    proc.kill()
    proc.wait(timeout=60)
    [left] = tmp_path.glob(".out.partial-*")
    assert not out.exists() and not (left / RUN_MARKER).exists()
    assert json.loads((left / PARTIAL_MARKER).read_text(encoding="utf-8"))["pid"] == proc.pid
    foreign = tmp_path / ".out.partial-mine"  # the user's, no volscan marker
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep", encoding="utf-8")
    live = tmp_path / ".out.partial-live"  # a run still going (this process)
    live.mkdir()
    (live / PARTIAL_MARKER).write_text((left / PARTIAL_MARKER).read_text(encoding="utf-8")
                                       .replace(str(proc.pid), str(os.getpid())), encoding="utf-8")
    assert main(argv) == 0
    assert not left.exists() and (foreign / "notes.txt").exists() and (live / PARTIAL_MARKER).exists()
    assert (out / RUN_MARKER).exists() and not (out / PARTIAL_MARKER).exists()


def test_an_interrupted_preprocess_output_is_marked_unfinished(finished: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`volscan preprocess` writes in place: while it runs (what `kill -9` leaves) its marker says
    it is unfinished, and a reader refuses it; once finished, it says complete."""
    import preprocessing.cohort
    from pipelines.run_folder import read_run_marker, verify_run
    from volumetric.errors import InputFileError

    out, seen = tmp_path / "pre", {}
    real = preprocessing.cohort.preprocess_cohort

    def watched(*args, **kwargs):
        seen["marker"] = read_run_marker(out)
        with pytest.raises(InputFileError, match="did not finish writing it"):
            verify_run(out, "preprocess")
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocessing.cohort, "preprocess_cohort", watched)
    assert main(["preprocess", str(finished["images"]), "-o", str(out), "--template", str(finished["template"]),
                 "--registered", "--skull-stripped", "--size", "28"]) == 0
    assert seen["marker"]["complete"] is False and seen["marker"]["checksums"] == {}
    marker = verify_run(out, "preprocess")
    # The store's records checksum every file; the marker does not hash the whole store again.
    assert marker["complete"] is True and marker["checksums"] == {}


def test_corrupt_token_cache_entry_is_rebuilt_with_a_warning(finished: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    cache = Path(shutil.copytree(finished["root"] / "cache", tmp_path / "cache"))
    entry = sorted((cache / "tokens").rglob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:-100])
    capsys.readouterr()
    argv = Ctx(finished, tmp_path, pytest.MonkeyPatch()).screen(finished["images"], tmp_path / "out")
    argv[argv.index("--cache") + 1] = str(cache)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "discarding corrupt token cache entry" in err and entry.name in err
    assert entry.is_file()  # rebuilt


# ---------------------------------------------------------------- cache entries bound to their key, duplicate inputs
# (issue 24, Build 1 and 2). Own parametrisation: the table above is collected before this block.

def _score_swapped_token_files(c: Ctx) -> Run:
    """Two scans' token files swapped in a cache `volscan extract` filled: score refuses, naming
    the cache's token file (read-only: the cache stays byte-identical)."""
    inputs, cache = c.inputs(), c.tmp / "cache"
    assert main(["extract", str(inputs), "-o", str(cache), "--config", str(c.base["config"]), "--template",
                 str(c.base["template"]), "--registered", "--skull-stripped"]) == 0
    a, b = sorted((cache / "tokens").rglob("*.safetensors"))[:2]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    argv = c.screen(inputs, c.tmp / "out")
    argv[0] = "score"
    return Run(argv, (f"{cache / 'tokens'}/", "token file was written for another scan or settings",
                      "run volscan extract"), (inputs, cache), c.tmp / "out")


def _screen_duplicate_input(c: Ctx) -> Run:
    """A byte-identical copy of a scan under another name: refused, naming both files."""
    inputs = c.inputs()
    first = sorted(inputs.iterdir())[0]
    copy = inputs / f"zz-copy-of-{first.name}"
    shutil.copy(first, copy)
    return Run(c.screen(inputs, c.tmp / "out"), (str(copy), f"same content as {first}", "remove one"), (inputs,),
               c.tmp / "out")


CACHE_CASES = {"score_swapped_token_files": _score_swapped_token_files,
               "screen_duplicate_input": _screen_duplicate_input}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_bad_input_cache_key_and_duplicates(case: str, finished: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(CASES, case, CACHE_CASES[case])
    test_bad_input(case, finished, tmp_path, monkeypatch, capsys)


def test_swapped_token_files_are_rebuilt_by_screen_with_a_warning(finished: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """The same swap under `volscan screen`: both files rebuilt, each named in a warning, and the
    scores those of the run before the swap."""
    ctx = Ctx(finished, tmp_path, pytest.MonkeyPatch())
    argv = ctx.screen(finished["images"], tmp_path / "clean")
    assert main(argv) == 0
    a, b = sorted((tmp_path / "cache" / "tokens").rglob("*.safetensors"))[:2]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    capsys.readouterr()
    argv[argv.index("-o") + 1] = str(tmp_path / "rebuilt")
    assert main(argv) == 0
    err = capsys.readouterr().err
    for path in (a, b):
        assert f"discarding corrupt token cache entry: {path}: token file was written for another scan" in err
    assert (tmp_path / "rebuilt" / "scores.csv").read_bytes() == (tmp_path / "clean" / "scores.csv").read_bytes()


def test_duplicates_are_equal_content_not_equal_size(tmp_path: Path) -> None:
    """Same size and same sampled blocks but one byte apart: two scans, accepted; the same bytes
    under two names: refused, naming both."""
    from pipelines.subjects import Subject, check_duplicates
    from volumetric.errors import InputFileError

    data = bytearray(np.random.default_rng(3).bytes(3 << 20))
    a, b, c = (tmp_path / f"{name}.nii" for name in "abc")
    a.write_bytes(bytes(data))
    data[(3 << 20) // 2 + 12345] ^= 1  # between the fingerprint's sampled blocks
    b.write_bytes(bytes(data))
    subjects = [Subject(p.stem, p) for p in (a, b)]
    check_duplicates(subjects)
    c.write_bytes(a.read_bytes())
    with pytest.raises(InputFileError, match=f"{c}: has the same content as {a}"):
        check_duplicates([*subjects, Subject("c", c)])
