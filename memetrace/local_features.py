"""Which local-feature extractor a process builds: OpenCV's SIFT (the default) or the torch one.

``MEMETRACE_LOCAL_FEATURES=torch`` runs :mod:`memetrace.torch_sift` on ``MEMETRACE_DEVICE`` (a CUDA
device keeps the whole extraction there); both give the same :class:`memetrace.keypoints.Keypoints`.
torch is imported only when it is chosen.
"""

from __future__ import annotations

from memetrace.errors import ConfigError
from memetrace.keypoints import KeypointExtractor
from memetrace.settings import Settings


def build_extractor(s: Settings) -> KeypointExtractor:
    if s.local_features == "opencv":
        return KeypointExtractor(s.sift_features, s.sift_max_side, s.sift_flat_max, s.sift_detect_half)
    if s.sift_detect_half:
        raise ConfigError("MEMETRACE_SIFT_DETECT_HALF works with MEMETRACE_LOCAL_FEATURES=opencv only: "
                         "unset one of them")
    from memetrace.embedder import pick_device
    from memetrace.torch_sift import TorchSiftExtractor

    return TorchSiftExtractor(s.sift_features, s.sift_max_side, s.sift_flat_max, pick_device(s.device))
