"""The first hour of a new user: the README's sequence works, and each slip is one clear line.

Rows in the style of `tests/test_bad_input.py` (exit code, one message line naming the file or
option, no traceback, inputs byte-identical, no output left), plus the check that every YAML/TOML
config example in the docs loads through the real config loader.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.cli import main
from test_bad_input import Run, check_refused
from test_screen import screen_setup

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    """Three scans of the synthetic cohort, their masks, the tiny-ViT config and a finished
    `screen --labels` run of them."""
    setup = screen_setup(tmp_path_factory.mktemp("first-hour"), tiny_vit_spec)
    images, labels = setup["root"] / "three", setup["root"] / "three-labels"
    images.mkdir()
    labels.mkdir()
    for path in sorted(setup["images"].iterdir())[:3]:
        shutil.copy(path, images / path.name)
        if (setup["labels"] / path.name).exists():
            shutil.copy(setup["labels"] / path.name, labels / path.name)
    run = setup["root"] / "run"
    assert main(_screen(setup, images, run, "--labels", str(labels))) == 0
    return dict(setup, images=images, labels=labels, run=run)


def _screen(setup: dict, images: Path, out: Path, *extra: str, config: Path | None = None) -> list[str]:
    return ["screen", str(images), "-o", str(out), "--config", str(config or setup["config"]),
            "--template", str(setup["template"]), "--registered", "--skull-stripped", *extra]


def _config(setup: dict, tmp: Path, text: str, name: str = "screen.yaml") -> Path:
    """The module's tiny-ViT config plus `text` (YAML lines that replace keys of the same name)."""
    added = {line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")}
    lines = [line for line in setup["config"].read_text(encoding="utf-8").splitlines()
             if line.split(":")[0] not in added]
    path = tmp / name
    path.write_text("\n".join(lines) + "\n" + text, encoding="utf-8")
    return path


def _renamed_masks(setup: dict, tmp: Path) -> Path:
    """The masks under names that match no scan (`case00_seg.nii.gz`)."""
    folder = tmp / "masks"
    folder.mkdir()
    for path in setup["labels"].iterdir():
        shutil.copy(path, folder / path.name.replace(".nii.gz", "_seg.nii.gz"))
    return folder


def _screen_labels_match_no_scan(s: dict, tmp: Path) -> Run:
    masks = _renamed_masks(s, tmp)
    first_id = sorted(p.name for p in s["images"].iterdir())[0].removesuffix(".nii.gz")
    return Run(_screen(s, s["images"], tmp / "out", "--labels", str(masks)),
               (str(masks), f"needs mask '{first_id}.nii.gz'", "named like 'case", "_seg.nii.gz'"),
               (s["images"], masks), tmp / "out")


def _screen_labels_folder_empty(s: dict, tmp: Path) -> Run:
    masks = tmp / "masks"
    masks.mkdir()
    return Run(_screen(s, s["images"], tmp / "out", "--labels", str(masks)), (str(masks), "holds no mask"),
               (s["images"],), tmp / "out")


def _evaluate_labels_match_no_scan(s: dict, tmp: Path) -> Run:
    run, masks = Path(shutil.copytree(s["run"], tmp / "run")), _renamed_masks(s, tmp)
    return Run(["evaluate", str(run), "--labels", str(masks)], (str(masks), "no mask is named like an input"),
               (run, masks))


def _evaluate_other_masks_need_force(s: dict, tmp: Path) -> Run:
    run = Path(shutil.copytree(s["run"], tmp / "run"))
    other = Path(shutil.copytree(s["labels"], tmp / "other"))
    return Run(["evaluate", str(run), "--labels", str(other)],
               ("already holds metrics against", str(s["labels"].resolve()), str(other.resolve()), "--force"),
               (run, other))


def _config_row(s: dict, tmp: Path, text: str, *needles: str, name: str = "screen.yaml") -> Run:
    """A screen whose config file is the module's plus `text` (TOML files: `text` alone)."""
    if name.endswith(".toml"):
        config = tmp / name
        config.write_text(text, encoding="utf-8")
    else:
        config = _config(s, tmp, text, name)
    return Run(_screen(s, s["images"], tmp / "out", config=config), (str(config), *needles), (s["images"], config),
               tmp / "out")


def _screen_nested_config_typo(s: dict, tmp: Path) -> Run:
    return _config_row(s, tmp, "scoring: {subset: 2}\n", "'scoring.subset'", "did you mean 'scoring.engine.subsets'?")


def _screen_nested_config_typo_toml(s: dict, tmp: Path) -> Run:
    return _config_row(s, tmp, "[scoring.codegraph]\niqr-kk = 3.0\n", "'scoring.codegraph.iqr_kk'",
                       "did you mean 'scoring.codegraph.iqr_k'?", name="screen.toml")


def _screen_nested_config_wrong_type(s: dict, tmp: Path) -> Run:
    return _config_row(s, tmp, "scoring:\n  engine: {subsets: two}\n", "'scoring.engine.subsets' must be an integer",
                       "'two'")


def _screen_preprocess_config_typo(s: dict, tmp: Path) -> Run:
    return _config_row(s, tmp, "preprocess:\n  registration: {thread: 2}\n", "'preprocess.registration.thread'",
                       "did you mean 'preprocess.registration.threads'?")


def _screen_cache_not_a_path(s: dict, tmp: Path) -> Run:
    return _config_row(s, tmp, "cache: [1, 2]\n", "'cache' must be a path", "[1, 2]")


def _classical(s: dict, tmp: Path, *extra: str, tokenizer: str = "{}") -> tuple[list[str], Path]:
    config = tmp / "classical.yaml"
    config.write_text(f"backbone: classical\nsize: 28\ndevice: cpu\ncache: {tmp / 'cache'}\ntokenizer: {tokenizer}\n",
                      encoding="utf-8")
    return _screen(s, s["images"], tmp / "out", *extra, config=config), config


def _screen_classical_precision_flag(s: dict, tmp: Path) -> Run:
    argv, config = _classical(s, tmp, "--precision", "bf16")
    return Run(argv, ("--backbone classical", "precision applies only to ViT"), (s["images"], config), tmp / "out")


def _screen_classical_slices_per_block_flag(s: dict, tmp: Path) -> Run:
    argv, config = _classical(s, tmp, "--slices-per-block", "7")
    return Run(argv, ("--backbone classical", "slices-per-block applies only to ViT"), (s["images"], config),
               tmp / "out")


def _screen_classical_precision_in_tokenizer_table(s: dict, tmp: Path) -> Run:
    argv, config = _classical(s, tmp, tokenizer="{precision: bf16}")
    return Run(argv, ("'tokenizer.precision' applies only to ViT", "scales, void_fraction"), (s["images"], config),
               tmp / "out")


def _screen_hub_unreachable_default_backbone(s: dict, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    config = _config(s, tmp, "backbone: vit_large_patch14_dinov2.lvd142m\nweights: null\nbackbone_kwargs: {}\n")
    return Run(_screen(s, s["images"], tmp / "out", config=config),
               ("vit_large_patch14_dinov2.lvd142m", "127.0.0.1:9 unreachable", "--weights PATH"),
               (s["images"], config), tmp / "out")


CASES: dict[str, Callable[..., Run]] = {name[1:]: fn for name, fn in globals().items()
                                        if name.startswith(("_screen_", "_evaluate_")) and callable(fn)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_hour_slip(case: str, first: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    build = CASES[case]
    run = build(first, tmp_path, monkeypatch) if "monkeypatch" in build.__code__.co_varnames else build(first, tmp_path)
    check_refused(run, capsys)
    assert "Retrying" not in caplog.text  # no hub client retry line either


def test_readme_sequence_screen_with_labels_then_evaluate(first: dict, tmp_path: Path, capsys) -> None:
    """`volscan screen scans/ -o run1 --labels masks/` then `volscan evaluate run1 --labels masks/`:
    exit 0, the same metrics, printed."""
    run = Path(shutil.copytree(first["run"], tmp_path / "run1"))
    before = json.loads((run / "report.json").read_text(encoding="utf-8"))["metrics"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--labels", str(first["labels"])]) == 0
    printed = capsys.readouterr().out
    after = json.loads((run / "report.json").read_text(encoding="utf-8"))["metrics"]
    assert after.keys() == before.keys() and "patient_auroc" in printed
    for key, value in before.items():
        if isinstance(value, float):
            assert after[key] == pytest.approx(value), key


# ---------------------------------------------------------------- the docs' config examples

# Inline examples such as `scoring: {engine: {subsets: 2}}`: a top-level key, then a flow mapping.
INLINE = re.compile(r"`([a-z_-]+: \{[^`]*\})`")
FENCED = re.compile(r"^```(yaml|yml|toml)\n(.*?)^```", re.S | re.M)


def doc_config_examples() -> list[tuple[str, str, str]]:
    """(where, suffix, text) of every YAML/TOML config example in README.md and docs/*.md
    (inline ones holding a `...` placeholder are not examples of a whole value)."""
    examples = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for match in FENCED.finditer(text):
            line = text[: match.start()].count("\n") + 1
            suffix = ".toml" if match.group(1) == "toml" else ".yaml"
            examples.append((f"{page.relative_to(REPO)}:{line}", suffix, match.group(2)))
        for match in INLINE.finditer(text):
            if "..." not in match.group(1):
                line = text[: match.start()].count("\n") + 1
                examples.append((f"{page.relative_to(REPO)}:{line}", ".yaml", match.group(1) + "\n"))
    return examples


def test_the_docs_hold_config_examples() -> None:
    where = {w.split(":")[0] for w, _, _ in doc_config_examples()}
    assert {"docs/screen.md", "docs/scale.md", "docs/preprocessing.md"} <= where
    assert len(doc_config_examples()) >= 6


@pytest.mark.parametrize(("where", "suffix", "text"), doc_config_examples(), ids=lambda v: str(v)[:40])
def test_every_config_example_in_the_docs_loads(where: str, suffix: str, text: str, tmp_path: Path) -> None:
    """Through the real loader and the settings check a screen runs first (scoring, preprocess,
    tokens): the docs cannot name a key the code does not take, or put it at the wrong depth."""
    from pipelines.screen_config import resolve_config
    from pipelines.plan import check_settings

    path = tmp_path / f"example{suffix}"
    path.write_text(text, encoding="utf-8")
    config = resolve_config(path)
    check_settings(config)
    config.preprocess_settings()
