"""Industrial inspection: zero- and few-shot anomaly detection with prompts, and defect search.

* :mod:`~vprompt.anomaly.base`: the anomaly-method contract and registry.
* Methods (each one file, registered on import): :mod:`~vprompt.anomaly.patch_memory`
  (PatchCore on any backbone), :mod:`~vprompt.anomaly.winclip` (WinCLIP / WinCLIP+),
  :mod:`~vprompt.anomaly.anomalyclip` (AnomalyCLIP), :mod:`~vprompt.anomaly.bayes_pfl` (Bayes-PFL).
* :mod:`~vprompt.anomaly.datasets`: MVTec AD, VisA and plain-folder readers and their checker.
* :mod:`~vprompt.anomaly.metrics`: image / pixel AUROC, F1-max and AUPRO (streaming).
* :mod:`~vprompt.anomaly.evaluate`, :mod:`~vprompt.anomaly.train`,
  :mod:`~vprompt.anomaly.pack_file`, :mod:`~vprompt.anomaly.output`.
* :mod:`~vprompt.anomaly.find_similar`: "circle a defect, find all similar".
"""

from vprompt.anomaly import (  # noqa: F401  (registers the methods)
    anomalyclip,
    bayes_pfl,
    patch_memory,
    winclip,
)
from vprompt.anomaly.base import (
    ANOMALY_METHODS,
    AnomalyCapabilities,
    AnomalyMethod,
    AnomalyOutput,
    InputFrame,
    register_anomaly_method,
)
from vprompt.anomaly.build import build_anomaly_method
from vprompt.anomaly.pack_file import (
    AnomalyPack,
    method_from_pack,
    pack_anomaly_method,
    read_anomaly_pack,
    save_anomaly_pack,
)

__all__ = [
    "ANOMALY_METHODS",
    "AnomalyCapabilities",
    "AnomalyMethod",
    "AnomalyOutput",
    "AnomalyPack",
    "InputFrame",
    "build_anomaly_method",
    "method_from_pack",
    "pack_anomaly_method",
    "read_anomaly_pack",
    "register_anomaly_method",
    "save_anomaly_pack",
]
