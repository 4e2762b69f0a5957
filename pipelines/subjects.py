"""Finding the scans of a screen run, their masks, and checking both before any heavy work.

A subject is one input file (a NIfTI volume or a 2D image) with an optional mask of the same
name in the labels folder; no mask, or an all-zero mask, means healthy. Every header is read
up front (cheap with nibabel / Pillow) so a corrupt file or a mask on another grid fails in
seconds, naming the file, instead of after an hour of token extraction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.ids import check_id
from pipelines.images2d import displayed_size, open_image
from preprocessing.io import NIFTI_SUFFIXES, Volume, check_header, check_same_grid
from volumetric.errors import InputFileError, VolscanError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Smallest usable volume edge (and 2D image side): registration pyramids and a token grid need
# several voxels.
MIN_EDGE = 8



@dataclass(frozen=True)
class Subject:
    """One scan to screen: `id` (file name without extension), its file, optional mask.

    `registered` / `skull_stripped` are per subject so one run can mix an already registered,
    skull-stripped cohort (BraTS) with raw scans (IXI).
    """

    id: str
    image: Path
    label: Path | None = None
    registered: bool = False
    skull_stripped: bool = False

    def __post_init__(self) -> None:
        # Accept str paths from API callers (frozen dataclass: set through object).
        object.__setattr__(self, "image", Path(self.image))
        if self.label is not None:
            object.__setattr__(self, "label", Path(self.label))

    def spec(self) -> Any:
        """This scan as `preprocessing.cohort.SubjectSpec` (per-subject flags kept)."""
        from preprocessing.cohort import SubjectSpec  # here: it loads torch, which input checks do not need

        return SubjectSpec(self.image, self.registered, self.skull_stripped, self.id)


def split_suffix(path: Path) -> tuple[str, str] | None:
    """(stem, suffix) for a supported file name, or None for anything else."""
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.name[: -len(suffix)], suffix
    return None


def input_kind(paths: Sequence[Path]) -> str:
    """"3d" for NIfTI files, "2d" for images; a mix is an error."""
    suffixes = [split_suffix(p)[1] for p in paths]  # type: ignore[index]
    n_3d = sum(s in NIFTI_SUFFIXES for s in suffixes)
    n_2d = len(suffixes) - n_3d
    if n_3d and n_2d:
        raise VolscanError(
            f"inputs mix {n_3d} NIfTI volume(s) and {n_2d} 2D image(s); screen 3D and 2D data in separate runs"
        )
    return "3d" if n_3d else "2d"


def supported_files(folder: Path, what: str) -> dict[str, Path]:
    """{id: path} of the supported files directly in `folder` (hidden files skipped)."""
    if not folder.exists():
        raise InputFileError(folder, f"{what} folder does not exist")
    if not folder.is_dir():
        raise InputFileError(folder, f"{what} path is not a folder")
    found: dict[str, Path] = {}
    ignored = []
    for path in sorted(folder.iterdir()):
        parsed = split_suffix(path) if path.is_file() and not path.name.startswith(".") else None
        if parsed is None:
            if not path.name.startswith("."):
                ignored.append(path.name)
            continue
        stem = parsed[0]
        if stem in found:
            raise InputFileError(path, f"two files share the id '{stem}' ({found[stem].name} and {path.name})")
        found[stem] = path
    if ignored:
        log.warning("%s: ignoring %d unsupported entries (e.g. %s)", folder, len(ignored), ignored[0])
    return found


def nifti_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(3D shape, affine) from a NIfTI header, checked without reading the data: a trailing
    singleton 4th dim counts as 3D; a grid under `MIN_EDGE` voxels along an axis, complex or RGB
    voxels and a header claiming more data than the file holds (`preprocessing.io.check_header`)
    are refused."""
    import nibabel as nib  # here: a missing input folder is answered before loading it

    try:
        header = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for non-NIfTI content
        raise InputFileError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in header.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputFileError(path, f"expected a 3D volume, got shape {tuple(header.shape)}")
    check_header(path, header)
    if min(shape) < MIN_EDGE:
        raise InputFileError(path, f"volume of {shape} voxels is too small (need at least {MIN_EDGE} along each axis)")
    return shape, np.asarray(header.affine, dtype=np.float64)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of a 2D image file as displayed (EXIF orientation), read from its header
    (see `images2d.open_image`); the file's structure verified."""
    with open_image(path) as image:
        try:
            image.verify()  # must come first after opening: it leaves the image unusable
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputFileError(path, f"not a readable image ({exc})") from None
    with open_image(path) as image:
        return displayed_size(image)


def image_grid(path: Path) -> tuple[int, int]:
    """(height, width) of a 2D input, refused under `MIN_EDGE` pixels along an axis (as volumes
    are: a 1 x 1 image has nothing to compare)."""
    height, width = image_size(path)
    if min(height, width) < MIN_EDGE:
        raise InputFileError(path, f"image of {height}x{width} pixels is too small (need at least {MIN_EDGE} "
                                   "along each axis)")
    return height, width


def check_label_grid(image: Path, label: Path, kind: str) -> None:
    """Raise `InputFileError` naming `label` if it is not on `image`'s grid."""
    if kind == "3d":
        # Header-only volumes: a zero-stride array carries the shape without reading the data.
        grids = []
        for path in (image, label):
            shape, affine = nifti_grid(path)
            grids.append(Volume(array=np.broadcast_to(np.float32(0), shape), affine=affine, path=path))
        check_same_grid(grids[1], grids[0])
    else:
        image_hw, label_hw = image_grid(image), image_size(label)
        if image_hw != label_hw:
            raise InputFileError(label, f"mask size {label_hw} does not match image {image.name} size {image_hw}")


def match_labels(labels_dir: str | Path, ids: Sequence[str], kind: str) -> dict[str, Path]:
    """{id: mask path} for the `ids` that have a mask of the same name in `labels_dir`.

    A folder with no mask, or whose masks match no input, is an `InputFileError` (metrics from
    it would count every scan healthy: a naming mistake, not a cohort); some unmatched masks
    beside matched ones are a warning naming one.
    """
    labels = supported_files(Path(labels_dir), "labels")
    if not labels:
        raise InputFileError(labels_dir, "labels folder holds no mask (NIfTI or image files named like the inputs)")
    if input_kind(list(labels.values())) != kind:
        raise InputFileError(labels_dir, f"masks are not {kind.upper()} like the inputs")
    matched = {i: labels[i] for i in ids if i in labels}
    if not matched:
        example = labels[min(labels)]
        suffix = split_suffix(example)[1]  # type: ignore[index]
        raise InputFileError(
            labels_dir,
            f"no mask is named like an input: input '{min(ids)}' needs mask '{min(ids)}{suffix}', "
            f"but the masks are named like '{example.name}' (rename them to their inputs' names)",
        )
    unmatched = sorted(set(labels) - set(ids))
    if unmatched:
        log.warning("%s: %d mask(s) have no input of the same name (e.g. %s)", labels_dir, len(unmatched), unmatched[0])
    return matched


def discover_subjects(
    input_dir: str | Path,
    labels_dir: str | Path | None = None,
    *,
    registered: bool = False,
    skull_stripped: bool = False,
    minimum: int = 2,
) -> tuple[list[Subject], str]:
    """Subjects of `input_dir` (sorted by id) and their kind ("3d" or "2d").

    Masks in `labels_dir` are matched by id (same file name, any supported extension of the
    same kind). Every input header and every mask grid is checked here. `minimum`: inputs
    needed (1 when they are scored against a `--reference` run).
    """
    input_dir = Path(input_dir)
    images = supported_files(input_dir, "input")
    if not images:
        raise InputFileError(
            input_dir,
            "no inputs found (expected NIfTI .nii/.nii.gz volumes or .png/.jpg/.jpeg/.tif/.tiff images)",
        )
    kind = input_kind(list(images.values()))
    labels = match_labels(labels_dir, list(images), kind) if labels_dir is not None else {}
    subjects = [
        Subject(id=stem, image=path, label=labels.get(stem), registered=registered, skull_stripped=skull_stripped)
        for stem, path in images.items()
    ]
    return subjects, validate_subjects(subjects, minimum)


def validate_subjects(subjects: Sequence[Subject], minimum: int = 2) -> str:
    """Check an explicit subject list (safe and unique ids, one kind, readable headers, masks
    on their image's grid; at least `minimum` of them) and return its kind, "3d" or "2d". A
    broken file is reported before a too small cohort, so a folder with one corrupt scan of two
    says which one."""
    if not subjects:
        raise VolscanError("no inputs given")
    for subject in subjects:
        check_id(subject.id, subject.image, len(subjects))
        for path in (subject.image, subject.label):
            if path is not None and split_suffix(Path(path)) is None:
                raise InputFileError(path, "unsupported file type (expected .nii/.nii.gz or .png/.jpg/.tif)")
    kind = input_kind([Path(s.image) for s in subjects])
    seen: set[str] = set()
    for subject in subjects:
        if subject.id in seen:
            raise InputFileError(subject.image, f"duplicate subject id '{subject.id}'")
        seen.add(subject.id)
        if not subject.image.is_file():
            raise InputFileError(subject.image, "input file does not exist")
        if subject.label is not None:
            if not subject.label.is_file():
                raise InputFileError(subject.label, "mask file does not exist")
            check_label_grid(subject.image, subject.label, kind)
        elif kind == "3d":
            nifti_grid(subject.image)
        else:
            image_grid(subject.image)
    check_duplicates(subjects)
    if len(subjects) < minimum:
        raise VolscanError(f"mutual scoring needs at least {minimum} inputs, got {len(subjects)}")
    return kind


def check_duplicates(subjects: Sequence[Subject]) -> None:
    """Refuse two inputs with the same content (byte-identical files), naming both: in mutual
    scoring each would find a perfect look-alike in the other, so a lesion scan's copy vouches
    for it (docs/screen.md). Only files of equal size are compared, first by a sampled fingerprint
    (1 MiB read per file: uncompressed volumes of one grid all have the same size), then by their
    full hash, remembered for the rest of the run (`volumetric.hashing.content_hash`)."""
    from volumetric.hashing import content_fingerprint, content_hash, content_size

    by_size: dict[int, list[Subject]] = {}
    for subject in subjects:
        by_size.setdefault(content_size(subject.image), []).append(subject)
    alike: dict[str, list[Subject]] = {}
    for group in (g for g in by_size.values() if len(g) > 1):
        for subject in group:
            alike.setdefault(content_fingerprint(subject.image), []).append(subject)
    for group in (g for g in alike.values() if len(g) > 1):
        seen: dict[str, Subject] = {}
        for subject in group:
            first = seen.setdefault(content_hash(subject.image), subject)
            if first is not subject:
                raise InputFileError(subject.image, f"has the same content as {first.image} (byte-identical "
                                                    "copies would vouch for each other); remove one of them")
