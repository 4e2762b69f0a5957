"""RsCIN (`volumetric.engine.rscin`) against MuSc's formulation written out, its guards, its
plumbing through `score_collections`, and MuSc's small-batch NaN (its issue 41) kept away."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.screen_config import ScreenConfig
from volumetric.engine import ScoringConfig, score_collections
from volumetric.engine.options import EngineOptions
from volumetric.engine.partners import global_features
from volumetric.engine.rscin import MVTEC_WINDOWS, VISA_WINDOWS, rscin
from volumetric.errors import VolscanError

QUIET = EngineOptions(progress=False)


def musc_rscin(scores_old: np.ndarray, cls_tokens: np.ndarray, k_list: list[int]) -> np.ndarray:
    """MuSc's RsCIN (models/modules/_RsCIN.py: RsCIN + MMO) written out with plain loops."""
    scores = (scores_old - scores_old.min()) / (scores_old.max() - scores_old.min())
    w = cls_tokens @ cls_tokens.T
    n = w.shape[0]
    per_window = []
    for k in k_list:
        w_mask = w.copy()
        for i in range(n):
            for j in np.argsort(w[i], kind="stable")[: n - k]:  # the n - k smallest of the row -> 0
                w_mask[i, j] = 0.0
        d = np.zeros((n, n))
        for i in range(n):
            d[i, i] = 1.0 / w_mask[i, :].sum()
        p = d @ w_mask
        per_window.append(p @ scores)
    return np.mean(per_window, axis=0)


def unit(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


@pytest.mark.parametrize("windows", [MVTEC_WINDOWS, VISA_WINDOWS, (2, 5)])
@pytest.mark.parametrize("normalised", [True, False])
def test_rscin_equals_muscs_formulation(windows: tuple[int, ...], normalised: bool) -> None:
    """Class-token-like descriptors (a shared direction plus noise: positive similarities), as
    given (the mobile form re-scores with raw features too) or L2-normalised; volscan's result,
    brought back to MuSc's [0, 1] units, equals MuSc's to 1e-6."""
    rng = np.random.default_rng(0)
    n = 40
    tokens = 1.5 + rng.normal(size=(n, 16)) * rng.uniform(0.3, 1.0, size=(n, 1))
    if normalised:
        tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    scores = rng.gamma(2.0, 1.0, size=n) + 3.0
    expected = musc_rscin(scores, tokens, list(windows))
    got = rscin(torch.tensor(scores), torch.tensor(tokens), windows).double().numpy()
    np.testing.assert_allclose(unit(got) * (expected.max() - expected.min()) + expected.min(), expected, atol=1e-6)
    # In the scores' own units: MuSc's values mapped back by min + s (max - min).
    np.testing.assert_allclose(got, scores.min() + expected * (scores.max() - scores.min()), rtol=1e-6)


def test_rscin_windows_and_guards() -> None:
    rng = np.random.default_rng(1)
    tokens = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(6, 5))), dim=1)
    scores = torch.tensor(rng.random(6))
    # k = 1 with normalised descriptors keeps each score (its own similarity, 1, is the row's maximum).
    torch.testing.assert_close(rscin(scores, tokens, [1]), scores.float())
    # A window larger than N keeps the whole row instead of failing.
    assert torch.isfinite(rscin(scores, tokens, [50])).all()
    # Constant scores and a single collection: unchanged, where MuSc's min-max gives 0 / 0 = NaN.
    torch.testing.assert_close(rscin(torch.full((6,), 2.5), tokens, MVTEC_WINDOWS), torch.full((6,), 2.5))
    torch.testing.assert_close(rscin(torch.tensor([0.7]), tokens[:1], MVTEC_WINDOWS), torch.tensor([0.7]))
    for bad, message in [
        (lambda: rscin(scores, tokens, [0]), "positive integers"),
        (lambda: rscin(scores, tokens, []), "positive integers"),
        (lambda: rscin(scores, tokens[:5], [1]), r"descriptors must be \(6, D\)"),
        (lambda: rscin(torch.tensor([0.1, float("nan")]), tokens[:2], [1]), "finite"),
        (lambda: rscin(scores, torch.zeros(6, 2), [2]), "no positive similarity"),  # all-zero descriptors
    ]:
        with pytest.raises(VolscanError, match=message):
            bad()


def _batch(n: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layers = [torch.nn.functional.normalize(torch.randn(n, 4, 5, 8, generator=g), dim=-1) for _ in range(2)]
    return layers, torch.ones(n, 4, 5, dtype=torch.bool)


def test_score_collections_applies_rscin_to_the_collection_scores() -> None:
    layers, valid = _batch(9)
    plain = score_collections(layers, valid, "musc", ScoringConfig(engine=QUIET))
    result = score_collections(layers, valid, "musc", ScoringConfig(rscin=(1, 2, 3), engine=QUIET))
    torch.testing.assert_close(result.element_scores, plain.element_scores, equal_nan=True)  # maps untouched
    descriptors = torch.nn.functional.normalize(global_features([x.reshape(9, 20, 8) for x in layers],
                                                                valid.reshape(9, 20)), dim=1)
    torch.testing.assert_close(result.collection_scores, rscin(plain.collection_scores, descriptors, (1, 2, 3)))
    assert not torch.equal(result.collection_scores, plain.collection_scores)
    # Given descriptors (raw, norms from 0.5 to 4) are L2-normalised first: cosine similarities.
    g = torch.Generator().manual_seed(4)
    given = torch.randn(9, 3, generator=g).abs() * torch.linspace(0.5, 4.0, 9)[:, None]
    with_given = score_collections(layers, valid, "musc", ScoringConfig(rscin=(1, 2), engine=QUIET),
                                   global_features=given)
    cosine = rscin(plain.collection_scores, torch.nn.functional.normalize(given, dim=1), (1, 2))
    torch.testing.assert_close(with_given.collection_scores, cosine)
    assert not torch.allclose(cosine, rscin(plain.collection_scores, given, (1, 2)))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_fewer_than_five_images_give_finite_scores(n: int) -> None:
    """MuSc's issue 41: with f = 0.3 and N < 5, floor(0.3 (N - 1)) = 0 partners and a mean over
    nothing (NaN). volscan takes at least one partner, and RsCIN on top stays finite."""
    layers, valid = _batch(n, seed=n)
    for config in (ScoringConfig(engine=QUIET), ScoringConfig(rscin=MVTEC_WINDOWS, engine=QUIET)):
        result = score_collections(layers, valid, "musc", config)
        assert torch.isfinite(result.element_scores).all() and torch.isfinite(result.collection_scores).all()


def test_rscin_setting_from_a_config_table() -> None:
    config = ScreenConfig(scoring={"rscin": [1, 8, 9]}).scoring_config("cpu")
    assert config.rscin == (1, 8, 9) and ScoringConfig().rscin is None
    with pytest.raises(VolscanError, match="rscin"):
        ScreenConfig(scoring={"rscin": [0]}).scoring_config("cpu")
