"""Import transformers' model code next to the CPU build of torch.

transformers imports torchvision when it is installed; the shim in synth/compat.py keeps that
import working next to CPU torch. Importing this module first is all a trainer module needs.
"""

from __future__ import annotations

import os

from synth.compat import ensure_torchvision_importable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ensure_torchvision_importable()
