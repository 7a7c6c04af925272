"""The text tokenizer and the paper's modality tokens.

``tiny`` trains a real byte-level BPE (``tokenizers``) on the corpus texts so tests exercise the
same code path as a released tokenizer; ``baichuan-omni-1.5`` points at a local Qwen2.5 tokenizer
directory. Either way the modality tokens of docs/PAPER.md §5.3/§6/§8 are present after loading.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer import hf_compat  # noqa: F401  (before transformers)

EOS = "<|endoftext|>"
IMG_START, IMG_PAD, IMG_END = "<img_start_baichuan>", "<img_pad_baichuan>", "<img_end_baichuan>"
AUDIO_START, AUDIO_PAD, AUDIO_END = "<audio_start_baichuan>", "<audio_pad_baichuan>", "<audio_end_baichuan>"
AUDIO_DELIM = "<audio_delim_baichuan>"
AUDIOGEN_START, AUDIOGEN_END = "<audiogen_start_baichuan>", "<audiogen_end_baichuan>"
AUDIOTEXT_START, AUDIOTEXT_END, AUDIOTEXT_PAD = (
    "<audiotext_start_baichuan>",
    "<audiotext_end_baichuan>",
    "<audiotext_pad_baichuan>",
)
VIDEO_START, VIDEO_END = "<video_start_baichuan>", "<video_end_baichuan>"
TRAINABLE_START, TRAINABLE_END = "<trainable_start>", "<trainable_end>"
CHAT = ("<B_SYS>", "<C_Q>", "<C_A>")

MODALITY_TOKENS = (
    IMG_START,
    IMG_PAD,
    IMG_END,
    AUDIO_START,
    AUDIO_PAD,
    AUDIO_END,
    AUDIO_DELIM,
    AUDIOGEN_START,
    AUDIOGEN_END,
    AUDIOTEXT_START,
    AUDIOTEXT_END,
    AUDIOTEXT_PAD,
    VIDEO_START,
    VIDEO_END,
    TRAINABLE_START,
    TRAINABLE_END,
    *CHAT,
)
SPECIAL_TOKENS = (EOS, *MODALITY_TOKENS)


@dataclass(frozen=True)
class SpecialIds:
    """Ids the sequence builder and the model agree on."""

    eos: int
    img_start: int
    img_pad: int
    img_end: int
    audio_start: int
    audio_pad: int
    audio_end: int
    audiogen_start: int
    audiogen_end: int
    video_start: int
    video_end: int
    audiotext_start: int  # before <C_A> when the assistant's answer is spoken (the released chat template)
    b_sys: int
    c_q: int
    c_a: int


def special_ids(tokenizer) -> SpecialIds:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return SpecialIds(
        eos=ids[EOS],
        img_start=ids[IMG_START],
        img_pad=ids[IMG_PAD],
        img_end=ids[IMG_END],
        audio_start=ids[AUDIO_START],
        audio_pad=ids[AUDIO_PAD],
        audio_end=ids[AUDIO_END],
        audiogen_start=ids[AUDIOGEN_START],
        audiogen_end=ids[AUDIOGEN_END],
        video_start=ids[VIDEO_START],
        video_end=ids[VIDEO_END],
        audiotext_start=ids[AUDIOTEXT_START],
        b_sys=ids[CHAT[0]],
        c_q=ids[CHAT[1]],
        c_a=ids[CHAT[2]],
    )


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 2048):
    """Train a byte-level BPE on ``texts`` with the modality tokens and save it as a HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=list(MODALITY_TOKENS),
    )
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    fast.save_pretrained(str(tmp))
    if out.exists():  # another process got there first with the same texts: keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return load_tokenizer(str(out))


def load_tokenizer(path: str | os.PathLike):
    """A local tokenizer directory (never a hub name), with any missing modality token added."""
    from transformers import PreTrainedTokenizerFast

    if not Path(path, "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    vocab = tok.get_vocab()
    missing = [t for t in MODALITY_TOKENS if t not in vocab]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)
    if tok.eos_token is None:
        tok.eos_token = EOS if EOS in tok.get_vocab() else tok.convert_ids_to_tokens(0)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
