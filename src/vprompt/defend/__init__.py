"""Input defences against adversarial patches, run before (or around) the frozen model.

Each defence is registered by name in :data:`DEFENSES` and built with :func:`build_defense`:

* ``lgs``: :mod:`~vprompt.defend.lgs`, Local Gradient Smoothing (Naseer et al., WACV 2019).
* ``feature-mask``: :mod:`~vprompt.defend.feature_mask`, mask the window of highest input-
  gradient saliency of the model's own prediction and re-predict.
* ``patchcleanser``: :mod:`~vprompt.defend.patchcleanser`, double masking with a certificate
  (Xiang et al., USENIX Security 2022).

:mod:`~vprompt.defend.evaluate` scores a defence on the test split, clean and under a patch.
"""

from vprompt.defend.base import (
    DEFENSES,
    Defense,
    DefenseOutput,
    SanitisingDefense,
    build_defense,
)
from vprompt.defend.feature_mask import FeatureMask, FeatureMaskConfig
from vprompt.defend.lgs import LGSConfig, LocalGradientSmoothing
from vprompt.defend.patchcleanser import PatchCleanser, PatchCleanserConfig

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseOutput",
    "FeatureMask",
    "FeatureMaskConfig",
    "LGSConfig",
    "LocalGradientSmoothing",
    "PatchCleanser",
    "PatchCleanserConfig",
    "SanitisingDefense",
    "build_defense",
]
