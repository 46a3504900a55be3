"""MONAI dictionary transforms for the SuPreM recipe (inference, training, scoring share them)."""

from .recipe import PRESETS, Recipe, inference_pre_transforms  # noqa: F401
from .checks import CheckCTd, InputError  # noqa: F401
from .labels import LabelToChannelsd, ProbsToLabeld, ResampleToInputd, organ_masks, probs_to_label  # noqa: F401
