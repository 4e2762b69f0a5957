"""The `volscan` command line: --version, grouped help with defaults, typo hints with the
sub-command's usage, quiet third-party logs, each message once, input errors answered before
any heavy import."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from pipelines.cli import configure_logging, main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("volscan ")


def test_screen_help_groups_options_and_shows_defaults(capsys) -> None:
    from volumetric.backbones import DEFAULT_LAYER_FRACTIONS, default_layers
    from volumetric.tokens import DEFAULT_PROJ_DIM

    with pytest.raises(SystemExit):
        main(["screen", "--help"])
    text = capsys.readouterr().out
    headings = [f"\n{group}:\n" for group in ("inputs", "preprocessing", "features", "scoring", "outputs", "compute")]
    positions = [text.index(h) for h in headings]
    assert positions == sorted(positions)
    features = text[text.index("\nfeatures:\n"):text.index("\nscoring:\n")]
    flat = " ".join(features.split())
    assert f"(default {DEFAULT_PROJ_DIM})" in flat  # the number shown is the tokenizer's default
    assert DEFAULT_LAYER_FRACTIONS == (0.5, 0.75) and default_layers(24) == [11, 17]
    assert "1/2 and 3/4 of the depth, e.g. 11 17 for ViT-L" in flat
    for option in ("--layers", "--proj-dim", "--backbone", "--weights", "--seed"):
        assert option in features
    assert "--method" in text[text.index("\nscoring:\n"):]
    assert "-o OUT, --out OUT" in text[text.index("\noutputs:\n"):]


def test_typo_answers_with_the_subcommand_usage_and_the_closest_option(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["screen", "in", "-o", "out", "--proj-dimm", "8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: volscan screen ")
    assert "unrecognized arguments: --proj-dimm 8 (did you mean --proj-dim?)" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "run", "--label", "x", "--forse"])
    err = capsys.readouterr().err
    assert err.startswith("usage: volscan evaluate ") and "did you mean --force?" in err


def test_third_party_info_is_quiet_unless_verbose_and_messages_print_once(capsys) -> None:
    configure_logging(0)
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
    logging.getLogger("pipelines.screen").info("stage tokens ...")
    for _ in range(2):
        logging.getLogger("huggingface_hub.utils").warning("retrying in 1s")
        warnings.warn("same warning", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "fontManager" not in err and "stage tokens" in err
    assert err.count("retrying in 1s") == 1 and err.count("UserWarning: same warning") == 1
    configure_logging(1)
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
    assert "fontManager" in capsys.readouterr().err
    configure_logging(0)


def test_extract_refuses_the_scoring_options_and_offers_no_other_choice_lists(capsys) -> None:
    """`volscan extract` scores nothing: `--method` / `--window` are refused with where they belong
    (never accepted and dropped), and its help does not list them. Every flag's choices come from
    `pipelines.choices`."""
    from pipelines.choices import (BIAS_CORRECTIONS, BIDS_SUFFIXES, EXPORTS, EXTRACT_STAGES, HDBET_MODES, MASK_METHODS,
                                   METHODS, PRECISIONS)
    from pipelines.cli import build_parser

    for flag, value in (("--window", "2"), ("--method", "musc")):
        with pytest.raises(SystemExit) as info:
            main(["extract", "in", flag, value])
        assert info.value.code == 2
        assert f"{flag} applies to scoring, which extract does not do; give it to volscan score" in \
            capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = capsys.readouterr().out
    assert "--window" not in text and "--method" not in text and "--precision" in text
    choices = {a.dest: tuple(a.choices) for a in build_parser("extract")[1]._actions if a.choices}
    assert choices == {"brain_mask": MASK_METHODS, "bias_correction": BIAS_CORRECTIONS,
                       "precision": PRECISIONS, "stage": EXTRACT_STAGES, "bids_suffix": BIDS_SUFFIXES,
                       "hdbet_mode": HDBET_MODES}
    screen = {a.dest: tuple(a.choices) for a in build_parser("screen")[1]._actions if a.choices}
    assert screen["method"] == METHODS and screen["precision"] == PRECISIONS and screen["export"] == EXPORTS


def test_input_error_before_any_heavy_import(tmp_path) -> None:
    """A missing input folder is answered without importing torch, timm, monai, matplotlib,
    SimpleITK or nibabel (what makes `volscan screen /no/such/folder -o out` answer at once)."""
    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        f"code = main(['screen', {str(tmp_path / 'missing')!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "heavy = [m for m in ('torch', 'timm', 'monai', 'matplotlib', 'SimpleITK', 'nibabel') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr
    assert result.stderr.strip() == f"volscan screen: error: {tmp_path / 'missing'}: input folder does not exist"
    assert not (tmp_path / "out").exists()
