"""Adversarial patches and robust accuracy of frozen models and their prompts.

* :mod:`~vprompt.attack.eot`: pasting a patch under random placements (Brown et al. 2017).
* :mod:`~vprompt.attack.victim`: the frozen model under attack, reading [0, 1] pixels.
* :mod:`~vprompt.attack.universal`: training one universal patch on the training split.
* :mod:`~vprompt.attack.pgd`: per-image L∞ and patch-region PGD (Madry et al. 2018).
* :mod:`~vprompt.attack.robust`: clean / patched accuracy and attack success on the test split.
* :mod:`~vprompt.attack.patch_file`: patch files (safetensors + JSON metadata, never pickles).
"""

from vprompt.attack.eot import (
    PatchTransformConfig,
    Placement,
    apply_patch,
    grid_placements,
    sample_placements,
)
from vprompt.attack.patch_file import PatchError, PatchFile, load_patch, save_patch
from vprompt.attack.pgd import ATTACKS, linf_pgd, patch_pgd
from vprompt.attack.robust import (
    RobustConfig,
    RobustReport,
    evaluate_patch_on,
    robust_accuracy,
    success_rate,
)
from vprompt.attack.universal import PatchTrainConfig, TrainedPatch, train_patch
from vprompt.attack.victim import Victim, victim_from_backbone, victim_from_method

__all__ = [
    "ATTACKS",
    "PatchError",
    "PatchFile",
    "PatchTrainConfig",
    "PatchTransformConfig",
    "Placement",
    "RobustConfig",
    "RobustReport",
    "TrainedPatch",
    "Victim",
    "apply_patch",
    "evaluate_patch_on",
    "grid_placements",
    "linf_pgd",
    "load_patch",
    "patch_pgd",
    "robust_accuracy",
    "sample_placements",
    "save_patch",
    "success_rate",
    "train_patch",
    "victim_from_backbone",
    "victim_from_method",
]
