"""Every named choice the command line offers, in one module without heavy imports.

The flags' `choices=`, the settings' checks and the messages all read these tuples, so a new
choice is added once, in the package that owns the option: preprocessing's in
`preprocessing.choices`, the tokens' in `volumetric.choices`, the pipeline's here.
"""

from preprocessing.choices import BIAS_CORRECTIONS, HDBET_MODES, MASK_METHODS
from volumetric.choices import PRECISIONS

__all__ = ["BIAS_CORRECTIONS", "BIDS_SUFFIXES", "EXPORTS", "EXTRACT_STAGES", "HDBET_MODES", "MASK_METHODS", "METHODS",
           "PRECISIONS", "listed"]

METHODS = ("codegraph", "musc")  # scoring methods (`volumetric.engine.score_collections`)
EXTRACT_STAGES = ("all", "spatial", "landmarks", "tokens")  # `volscan extract --stage`
BIDS_SUFFIXES = ("T1w", "T2w", "FLAIR")  # `--bids-suffix` (`pipelines.bids`)
EXPORTS = ("mood",)  # `--export` (`pipelines.mood`)


def listed(choices: tuple[str, ...]) -> str:
    """'a, b or c': the choices as a help line or an error message names them."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
