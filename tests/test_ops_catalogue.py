"""``omni ops``: every registered operator with its purpose, parameters and resources, from the code."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from pipelines.catalogue import BUILTIN_PACKAGES, catalogue, lookup, markdown, split_docstring
from pipelines.cli import main
from pipelines.operator import UnknownOperator, _parameters, registered

REPO = Path(__file__).resolve().parents[1]


def _ours() -> dict[str, type]:
    return {n: c for n, c in registered().items() if c.__module__.split(".")[0] in BUILTIN_PACKAGES}


def test_every_registered_operator_and_parameter_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    infos = {i.name: i for i in catalogue()}
    assert set(infos) == set(_ours()) and len(infos) >= 20
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    for name, cls in _ours().items():
        info = infos[name]
        named, _ = _parameters(cls)
        assert [p.name for p in info.params] == list(named), name  # the signature recipes are checked against
        assert info.purpose and not info.purpose.startswith("Params"), name
        assert f"\n{name}  [" in out, name
        for p in info.params:
            assert p.name in out.split(f"\n{name}  [", 1)[1].split("\n\n", 1)[0], (name, p.name)
    assert "commands, not pipeline steps:" in out and "  dedup: `omni dedup RUN_OR_SHARDS" in out


def test_every_parameter_has_a_meaning_and_no_entry_is_stale() -> None:
    """The Params: blocks cannot drift: a new parameter without a meaning, or an entry naming a parameter
    that is gone, fails here."""
    for info in catalogue():
        assert info.missing == [], f"{info.name}: no Params: entry for {info.missing}"
        assert info.stale == [], f"{info.name}: Params: entries for no parameter: {info.stale}"


def test_types_defaults_ranges_resources_and_kinds_come_from_the_code() -> None:
    langid = lookup("langid")
    p = {x.name: x for x in langid.params}
    assert p["short_chars"].type == "int" and p["short_chars"].default == "40" and p["short_chars"].range == "[0, inf]"
    assert p["und_below"].meaning.startswith("the final score under which")
    assert langid.resources.memory_mb == 1024 and langid.stateful
    assert lookup("keep").resources.cpus == 0.25 and not lookup("keep").stateful
    assert lookup("transcribe_gpu").resources.gpus == 1 and lookup("transcribe").resources.gpus == 0
    assert [x.name for x in lookup("transcribe_gpu").params] == [x.name for x in lookup("transcribe").params]
    clip = {x.name: x for x in lookup("clip_score").params}
    assert clip["model"].required and clip["checkpoint"].default == "null"
    assert lookup("build_tts").kinds == ("text",)  # a builder's class attribute
    assert lookup("text_quality").kinds == ("text", "interleaved_image_text")  # a kinds parameter's default
    share = {x.name: x for x in lookup("build_asr").params}["share"]  # documented once, on the base class
    assert share.meaning and share.range == "[0.0, 1.0]"
    tokens = lookup("count_tokens")
    assert tokens.extra and tokens.extra[0] == "**rules" and "video_fps" in tokens.extra[1]
    assert lookup("content_hash").params == [] and lookup("content_hash").extra is None


def test_one_operator_in_detail_and_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ops", "validate"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("validate  (filters.integrity.Validate)")
    assert "  max_pixels: int (default 64000000)\n      an image with more pixels is rejected" in out
    assert "resources (a step's `resources:` overrides them):\n  cpus: 1\n  gpus: 0" in out
    assert main(["ops", "kep"]) == 2
    err = capsys.readouterr().err
    assert err == "omni: error: unknown operator 'kep'; did you mean 'keep'?\n"
    assert main(["ops", "zzzzzz"]) == 2
    assert "unknown operator 'zzzzzz'; known: build_aqa, build_asr, " in capsys.readouterr().err
    assert main(["ops", "dedup"]) == 0  # a command: said so, not an error
    assert capsys.readouterr().out.startswith("dedup is a command, not an operator: `omni dedup")
    with pytest.raises(UnknownOperator):
        lookup("dedup")


def test_committed_docs_are_the_generated_catalogue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/operators.md is `omni ops --markdown`'s output; after changing an operator, regenerate it."""
    fresh = markdown(catalogue())
    committed = (REPO / "docs" / "operators.md").read_text(encoding="utf-8")
    assert committed == fresh, "docs/operators.md is stale: run `.venv/bin/omni ops --markdown`"
    out = tmp_path / "sub" / "ops.md"
    assert main(["ops", "--markdown", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == fresh
    assert capsys.readouterr().out == f"wrote {out}: {len(catalogue())} operators\n"
    for info in catalogue():
        assert f"\n## {info.name}\n" in fresh
    assert "| `max_pixels` | `int` | `64000000` |" in fresh and "`float \\| None`" in fresh


def test_params_block_convention() -> None:
    doc = inspect.cleandoc(
        """Purpose line.

        More prose.

        Params:
            alpha: the first, wrapping
                onto a second line.
            beta: the second.
            **extra: other keywords.

        Trailing prose."""
    )
    text, entries = split_docstring(doc)
    assert entries == {
        "alpha": "the first, wrapping onto a second line.",
        "beta": "the second.",
        "**extra": "other keywords.",
    }
    assert text == "Purpose line.\n\nMore prose.\n\nTrailing prose."


def test_a_recipes_own_operators_are_catalogued_too() -> None:
    infos = {i.name: i for i in catalogue(("tests.ops_for_tests",))}
    held = infos["test_holds_a_model"]
    assert [p.name for p in held.params] == ["column"] and held.missing == ["column"]  # undocumented: said so
    assert "test_holds_a_model" not in {i.name for i in catalogue()}
