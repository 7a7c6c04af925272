"""Import open_clip next to the CPU build of torch.

PyPI's torchvision wheels are CUDA builds; next to CPU torch their C++ ops are missing and
``import torchvision`` dies registering fake kernels for ``torchvision::nms``. open_clip needs only
torchvision's pure-Python transforms, so the fake-kernel module is skipped and nothing else changes.
Where torchvision imports cleanly (a GPU machine) the shim is never applied.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def ensure_torchvision_importable() -> None:
    """Apply the shim if needed; open_clip and transformers both import torchvision."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
    except ImportError:
        pass  # no torchvision at all: nothing to fix


def import_open_clip() -> Any:
    ensure_torchvision_importable()
    import open_clip

    return open_clip
