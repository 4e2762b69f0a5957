"""The named choices of preprocessing options, in a module without heavy imports.

The CLI (`volscan --help` stays fast), the screen config and `PreprocessSettings` all validate
against these tuples, so a new choice is added here once.
"""

MASK_METHODS = ("auto", "hd-bet", "deepbet", "template", "nonzero")
CONTRASTS = ("auto", "t1", "t1c", "t2", "flair", "pd", "other")
BIAS_CORRECTIONS = ("auto", "none", "n4")
HDBET_MODES = ("fast", "accurate")  # 1 fold, no mirroring | 5 folds x 8 mirrorings
