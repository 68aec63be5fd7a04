"""Which local-feature extractor a process builds: OpenCV's SIFT (the default) or the torch one.

``MEMETRACE_LOCAL_FEATURES=torch`` runs :mod:`memetrace.torch_sift` on ``MEMETRACE_DEVICE`` (a CUDA
device keeps the whole extraction there); both give the same :class:`memetrace.keypoints.Keypoints`.
torch is imported only when it is chosen.
"""

from __future__ import annotations

from memetrace.keypoints import KeypointExtractor, SiftConfig
from memetrace.settings import Settings


def build_extractor(s: Settings) -> KeypointExtractor:
    if s.local_features == "opencv":
        return KeypointExtractor(SiftConfig.from_settings(s))
    from memetrace.embedder import pick_device
    from memetrace.torch_sift import TorchSiftExtractor

    return TorchSiftExtractor(SiftConfig.from_settings(s), pick_device(s.device))
