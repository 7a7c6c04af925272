"""SFT conversations in the released chat template: the loss mask is exactly the assistant turns for every
sft kind, a spoken assistant turn gives the audio head its targets and carries the system prompt's voice,
and a user's speech is input only.

Each conversation is written once as plain messages; the test derives both the Sample (segments with
``role``/``turn`` meta, docs in /work/plan/sft.md) and, independently of the builder, the token layout
the template prescribes (Baichuan-Omni-1.5 ``web_demo/constants.py`` ``role_prefix`` and
``preprocess_messages``: ``<B_SYS>`` system, ``<C_Q>`` user, ``<audiotext_start_baichuan><C_A>`` a
spoken answer, ``<C_A>`` a written one) with the positions that must carry loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.demo_data import asterisk_prompts, photo_bytes, slideshow
from shards.schema import SFT_KINDS, Segment, make_sample
from trainer.data import Pack, collate, pack_arrays
from trainer.media import MediaProcessor
from trainer.model import AUDIO_GEN_TAG, TAGS, build_model
from trainer.sequence import IGNORE, SkipSample, build_example
from trainer.stages import load_model_config
from trainer.tokenizer import load_tokenizer, special_ids

VOICE = "邻家女声"
SYSTEM = f"请用【{VOICE}】这个声音回答问题。"  # the released demo's voice-control system prompt

# (role, items), an item: ("text", str) | ("image" | "video" | "audio", bytes) | ("speech", bytes, words)
Message = tuple[str, list[tuple]]


@pytest.fixture(scope="module")
def env(text_tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tok = load_tokenizer(text_tokenizer_dir)
    cfg = load_model_config("tiny")
    work = tmp_path_factory.mktemp("sft_media")
    frames = []
    for name in ("coffee", "astronaut"):
        path = work / f"{name}.jpg"
        path.write_bytes(photo_bytes(name, size=(96, 80)))
        frames.append(path)
    prompts = asterisk_prompts(limit=3)
    return {
        "tok": tok,
        "sp": special_ids(tok),
        "cfg": cfg,
        "media": MediaProcessor.from_model_config(cfg),
        "image": photo_bytes("coffee", size=(96, 80)),
        "video": slideshow(frames, None, Path(work / "show.mp4")).read_bytes(),
        "speech": [(wav.read_bytes(), text) for wav, text in prompts],
    }


@pytest.fixture(scope="module")
def model(env: dict[str, Any]):
    torch.manual_seed(0)
    return build_model(env["cfg"], env["tok"]).eval()


def sample_of(kind: str, conv: list[Message], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    segs = []
    for turn, (role, items) in enumerate(conv):
        for item in items:
            m: dict[str, Any] = {"role": role, "turn": turn}
            if item[0] == "text":
                segs.append(Segment("text", text=item[1], meta=m))
            elif item[0] == "speech":  # a spoken answer: its words as the tts step records them
                segs.append(Segment("audio", bytes=item[1], meta={**m, "tts": {"text": item[2], "voice": VOICE}}))
            else:
                segs.append(Segment(item[0], bytes=item[1], meta=m))
    return make_sample("sft-test", kind, segs, locator=f"{kind}/{len(conv)}", meta=meta)


def layout(env: dict[str, Any], conv: list[Message]) -> tuple[list[int], list[bool]]:
    """Token ids and which of them carry text loss, straight from the template (not the builder)."""
    tok, media = env["tok"], env["media"]

    def tid(token: str) -> int:
        return tok.convert_tokens_to_ids(token)

    def text(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    def image(data: bytes) -> list[int]:
        return (
            [tid("<img_start_baichuan>")]
            + [tid("<img_pad_baichuan>")] * media.image(data).tokens
            + [tid("<img_end_baichuan>")]
        )

    ids: list[int] = []
    learn: list[bool] = []

    def put(tokens: list[int], loss: bool) -> None:
        ids.extend(tokens)
        learn.extend([loss] * len(tokens))

    for role, items in conv:
        if role == "assistant":
            spoken = any(item[0] == "speech" for item in items)
            has_text = any(item[0] == "text" for item in items)
            put([tid("<audiotext_start_baichuan>")] if spoken else [], False)
            put([tid("<C_A>")], False)
            for item in items:
                if item[0] == "text":
                    put(text(item[1]), True)
                else:
                    if not has_text:
                        put(text(item[2]), True)
                    put([tid("<audiogen_start_baichuan>")], True)
                    put([tid("<audio_pad_baichuan>")] * media.audio_clip(item[1]).frames, False)
                    put([tid("<audiogen_end_baichuan>")], True)
            put([tid("<|endoftext|>")], True)
            continue
        put([tid("<B_SYS>" if role == "system" else "<C_Q>")], False)
        for item in items:
            kind, value = item[0], item[1]
            if kind == "text":
                put(text(value), False)
            elif kind == "image":
                put(image(value), False)
            elif kind == "audio":
                pads = [tid("<audio_pad_baichuan>")] * media.audio_clip(value).frames
                put([tid("<audio_start_baichuan>"), *pads, tid("<audio_end_baichuan>")], False)
            elif kind == "video":
                put([tid("<video_start_baichuan>")], False)
                for frame in media.video(value):
                    put(
                        [tid("<img_start_baichuan>")] + [tid("<img_pad_baichuan>")] * frame.tokens,
                        False,
                    )
                    put([tid("<img_end_baichuan>")], False)
                put([tid("<video_end_baichuan>")], False)
    if conv[-1][0] != "assistant":
        put([tid("<|endoftext|>")], False)
    learn[0] = False
    return ids, learn


def build(env: dict[str, Any], sample: dict[str, Any]):
    return build_example(sample, None, env["tok"], env["sp"], env["media"])


def assert_mask_is_the_assistant_spans(env: dict[str, Any], kind: str, conv: list[Message], meta=None):
    ex = build(env, sample_of(kind, conv, meta))
    ids, learn = layout(env, conv)
    assert ex.ids == ids, env["tok"].decode(ex.ids)
    learned = [i for i, lab in enumerate(ex.labels) if lab != IGNORE]
    assert learned == [i for i, on in enumerate(learn) if on]
    assert all(ex.labels[i] == ex.ids[i] for i in learned)
    return ex


def conversations(env: dict[str, Any]) -> dict[str, list[Message]]:
    (q_wav, q_text), (a_wav, a_text), (b_wav, b_text) = env["speech"]
    return {
        "sft_text": [
            ("system", [("text", "You are a helpful assistant.")]),
            ("user", [("text", "Name a hot drink.")]),
            ("assistant", [("text", "Coffee is a hot drink.")]),
            ("user", [("text", "And a cold one?")]),
            ("assistant", [("text", "Iced tea.")]),
        ],
        "sft_image": [
            ("user", [("image", env["image"]), ("text", "What is in the picture?")]),
            ("assistant", [("text", "A cup of coffee on a saucer.")]),
        ],
        "sft_video": [
            ("user", [("video", env["video"]), ("text", "What does the video show?")]),
            ("assistant", [("text", "A slideshow of a coffee cup and an astronaut.")]),
        ],
        "sft_audio": [  # a spoken question with a written answer: the user's speech is input
            ("user", [("audio", q_wav)]),
            ("assistant", [("text", f"You said: {q_text}")]),
        ],
        "sft_image_audio": [
            ("user", [("image", env["image"]), ("audio", q_wav)]),
            ("assistant", [("text", "The photograph shows a cup of coffee.")]),
        ],
        "sft_audio_generation": [
            ("system", [("text", SYSTEM)]),
            ("user", [("audio", q_wav)]),
            ("assistant", [("text", a_text), ("speech", a_wav, a_text)]),
            ("user", [("text", "Say it once more.")]),
            ("assistant", [("speech", b_wav, b_text)]),  # no text segment: the words come from meta.tts.text
        ],
    }


@pytest.mark.parametrize("kind", SFT_KINDS)
def test_loss_mask_is_exactly_the_assistant_spans_for_every_sft_kind(env, kind: str) -> None:
    conv = conversations(env)[kind]
    meta = {"voice": VOICE} if kind == "sft_audio_generation" else None
    ex = assert_mask_is_the_assistant_spans(env, kind, conv, meta)
    tag = {"sft_text": "text", "sft_image": "image", "sft_video": "video", "sft_image_audio": "omni"}
    assert ex.tag == TAGS.index(tag.get(kind, "audio"))
    spoken = [a.generate for a in ex.audios]
    if kind == "sft_audio_generation":
        assert spoken == [False, True, True], "the user's question is heard; both answers are spoken"
    else:
        assert not any(spoken), "understanding data never trains the audio head"
    image_pads = [lab for i, lab in zip(ex.ids, ex.labels, strict=True) if i == env["sp"].img_pad]
    assert all(lab == IGNORE for lab in image_pads)


def test_multi_turn_with_and_without_a_system_prompt(env) -> None:
    tok = env["tok"]
    turns: list[Message] = [
        ("user", [("text", "Name a hot drink.")]),
        ("assistant", [("text", "Coffee.")]),
        ("user", [("image", env["image"]), ("text", "Is this one?")]),
        ("assistant", [("text", "Yes, coffee.")]),
    ]
    bare = assert_mask_is_the_assistant_spans(env, "sft_image", turns)
    with_sys = assert_mask_is_the_assistant_spans(env, "sft_image", [("system", [("text", "Be brief.")]), *turns])
    assert bare.ids[0] == env["sp"].c_q and with_sys.ids[0] == env["sp"].b_sys
    sys_len = len(with_sys) - len(bare)
    assert with_sys.ids[sys_len:] == bare.ids and with_sys.labels[sys_len + 1 :] == bare.labels[1:]
    learned = tok.decode([i for i, lab in zip(bare.ids, bare.labels, strict=True) if lab != IGNORE])
    assert learned == "Coffee.<|endoftext|>Yes, coffee.<|endoftext|>", "each answer and the eos that ends it"
    # a conversation that ends on a question still ends with an eos, which teaches nothing
    ends_asking = assert_mask_is_the_assistant_spans(env, "sft_text", turns[:3])
    assert ends_asking.ids[-1] == env["sp"].eos and ends_asking.labels[-1] == IGNORE


def test_spoken_assistant_turn_trains_the_audio_head_in_the_system_prompts_voice(env, model) -> None:
    (q_wav, _), (a_wav, a_text), _ = env["speech"]
    conv: list[Message] = [
        ("system", [("text", SYSTEM)]),
        ("user", [("audio", q_wav)]),
        ("assistant", [("text", a_text), ("speech", a_wav, a_text)]),
    ]
    ex = assert_mask_is_the_assistant_spans(env, "sft_audio_generation", conv, {"voice": VOICE})
    sp = env["sp"]
    assert ex.voice == VOICE and ex.truncated(len(ex) - 1).voice == VOICE
    assert ex.ids[0] == sp.b_sys and VOICE in env["tok"].decode(ex.ids[1 : ex.ids.index(sp.c_q)])
    assert [a.generate for a in ex.audios] == [False, True]
    c_a = ex.ids.index(sp.c_a)
    assert ex.ids[c_a - 1] == sp.audiotext_start, "<audiotext_start_baichuan> precedes <C_A> (released order)"
    words = env["tok"].encode(a_text, add_special_tokens=False)
    assert ex.ids[c_a + 1 : c_a + 1 + len(words)] == words and ex.ids[c_a + 1 + len(words)] == sp.audiogen_start

    batch = collate([pack_arrays(Pack([ex]), len(ex), sp.eos, {})])
    batch.pop("meta")
    with torch.no_grad():
        chunk_codes = model.audio_tokenizer(batch["audio_mels"])
        per_clip: list[list[torch.Tensor]] = [[] for _ in ex.audios]
        for c, clip in zip(chunk_codes, batch["audio_chunk_clip"].tolist(), strict=True):
            per_clip[clip].append(c)
        clip_codes = [torch.cat(cs) for cs in per_clip]
        rows, codes = model._audio_targets(
            batch["input_ids"].reshape(-1), clip_codes, batch["audio_frames"], batch["audio_generate"]
        )
        out = model(**batch)
    start, end, _, index = next(s for s in ex.spans if s[2] == "audio" and ex.audios[s[3]].generate)
    frames = ex.audios[index].frames
    assert rows.tolist() == list(range(start, end - 1)), "<audiogen_start> and every frame of the answer only"
    n_q = codes.shape[1]
    assert torch.equal(codes[:frames], clip_codes[index])
    assert codes.shape[0] == frames + 1 and torch.equal(codes[-1], torch.tensor(model.codebook_sizes))
    assert out["tag_count"][AUDIO_GEN_TAG] == (frames + 1) * n_q
    assert torch.isfinite(out["loss"])


def test_a_users_speech_is_input_only(env, model) -> None:
    (q_wav, q_text), _, _ = env["speech"]
    conv: list[Message] = [("user", [("audio", q_wav)]), ("assistant", [("text", q_text)])]
    ex = assert_mask_is_the_assistant_spans(env, "sft_audio", conv)
    sp = env["sp"]
    assert [a.generate for a in ex.audios] == [False] and sp.audiogen_start not in ex.ids
    assert sp.audiotext_start not in ex.ids and ex.voice is None
    batch = collate([pack_arrays(Pack([ex]), len(ex), sp.eos, {})])
    batch.pop("meta")
    with torch.no_grad():
        out = model(**batch)
    assert out["tag_count"][AUDIO_GEN_TAG] == 0 and out["tag_count"][TAGS.index("audio")] > 0


def test_conversations_without_roles_or_answers_are_skipped_with_a_reason(env) -> None:
    plain = make_sample("sft-test", "sft_text", [Segment("text", text="Hello there.")], locator="x")
    with pytest.raises(SkipSample, match="sft segment without a role"):
        build(env, plain)
    bad_role = sample_of("sft_text", [("user", [("text", "Hi.")])])
    bad_role["segments"][0]["meta"] = '{"role": "narrator", "turn": 0}'
    with pytest.raises(SkipSample, match="sft segment without a role"):
        build(env, bad_role)
    with pytest.raises(SkipSample, match="nothing to learn"):
        build(env, sample_of("sft_text", [("system", [("text", "Be brief.")]), ("user", [("text", "Hi.")])]))
    drawn = sample_of("sft_image", [("user", [("text", "Draw a cup.")]), ("assistant", [("image", env["image"])])])
    with pytest.raises(SkipSample, match="assistant turn with an image"):
        build(env, drawn)
    broken = sample_of("sft_audio", [("user", [("audio", b"RIFF0000WAVEjunk")]), ("assistant", [("text", "Ok.")])])
    with pytest.raises(SkipSample):
        build(env, broken)
