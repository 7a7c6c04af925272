"""The operator catalogue behind ``omni ops``: every registered operator, read from the code itself.

Nothing here is written by hand, so it cannot drift from what a recipe accepts:

- the purpose is the first paragraph of the operator's docstring;
- parameters (name, type, default, required) come from ``__init__``'s signature, the same one
  ``pipelines.operator.param_problem`` checks recipes against (up the MRO where ``**kwargs`` are
  forwarded), with ``param_ranges`` as their bounds;
- a parameter's meaning comes from the ``Params:`` block of the docstring of the class that takes
  it (or a base class), one entry per parameter::

      Params:
          max_pixels: image decompression-bomb limit.
          timeout_s: seconds per ffmpeg call; a longer one
              continues on lines indented deeper.
          **rules: what other keywords mean (for an ``__init__`` that takes ``**rules``).

- resources are the class's declared ``Resources`` (a recipe step's ``resources`` overrides them),
  ``stateful`` says whether Ray runs it as an actor pool, and ``kinds`` (a class attribute of the
  builders) or a ``kinds`` parameter's default are the sample kinds it takes.

``tests/test_ops_catalogue.py`` checks that every parameter has a meaning, that no ``Params:``
entry names a parameter the signature lacks, and that ``docs/operators.md`` is this module's output.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipelines.operator import Operator, Resources, UnknownOperator, _describe, _load_operators, _parameters, registered

# where our own operators live; a recipe's ``imports`` add theirs
BUILTIN_PACKAGES = ("filters", "synth", "pipelines", "shards")
# commands that look like steps but are not: listed so a user finds them
COMMANDS = {
    "dedup": "`omni dedup RUN_OR_SHARDS [--config dedup.yaml] [--dry-run]`: exact and near-duplicate removal "
    "(MinHash LSH over text, perceptual hashes for images, chromaprint for audio) across a finished run or a "
    "shard set; a command run after `omni run`, not a pipeline step",
}
DEFAULT_MARKDOWN = "docs/operators.md"

_ENTRY = re.compile(r"^(\*\*)?([A-Za-z_]\w*):\s*(.*)$")


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str  # the annotation as written, "" when there is none
    default: str | None  # as YAML; None when required
    meaning: str
    range: str = ""  # "[0, 1]" from param_ranges

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class OperatorInfo:
    name: str
    cls: str  # module.QualName
    purpose: str
    description: str  # the rest of the docstring, without its Params block
    params: list[ParamInfo]
    resources: Resources
    stateful: bool
    kinds: tuple[str, ...] | None
    extra: tuple[str, str] | None = None  # (**name, meaning) when it takes other keywords too
    missing: list[str] = field(default_factory=list)  # parameters without a meaning (a test keeps it empty)
    stale: list[str] = field(default_factory=list)  # Params entries naming no parameter (idem)


def split_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """``(text without the Params block, {name: meaning})`` of a cleaned docstring.

    The block starts at a line ``Params:``; entries are ``name: meaning`` one indent in, continued on
    deeper lines; ``**name: meaning`` describes the keywords ``**name`` takes. It ends at the first
    line indented no deeper than ``Params:``."""
    lines = doc.splitlines()
    kept: list[str] = []
    entries: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != "Params:":
            kept.append(line)
            i += 1
            continue
        base = len(line) - len(line.lstrip())
        current: str | None = None
        entry_indent = base + 1
        i += 1
        while i < len(lines):
            raw = lines[i]
            indent = len(raw) - len(raw.lstrip())
            if raw.strip() and indent <= base:
                break
            i += 1
            if not raw.strip():
                continue
            match = _ENTRY.match(raw.strip())
            if match and (current is None or indent <= entry_indent):
                current = ("**" if match[1] else "") + match[2]
                entry_indent = indent
                entries[current] = match[3].strip()
            elif current is not None:
                entries[current] = f"{entries[current]} {raw.strip()}".strip()
    return "\n".join(kept).strip(), entries


def _own_doc(klass: type) -> str:
    doc = vars(klass).get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _doc_of(cls: type[Operator]) -> str:
    """The docstring of the nearest class that has one (a ``*_gpu`` twin has its base's)."""
    for klass in cls.__mro__:
        if klass is Operator:
            break
        if _own_doc(klass):
            return _own_doc(klass)
    return ""


def _meanings(cls: type[Operator]) -> dict[str, str]:
    """Every Params entry up the MRO; a subclass's entry wins over its base's."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass is Operator or klass is object:
            break
        for name, meaning in split_docstring(_own_doc(klass))[1].items():
            out.setdefault(name, meaning)
    return out


def yaml_value(value: Any) -> str:
    """A default as a recipe would write it: ``null``, ``true``, ``[text, image]``, ``0.5``."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16, allow_unicode=True, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _purpose(text: str) -> str:
    first = text.split("\n\n", 1)[0]
    return " ".join(first.split())


def _range(bounds: tuple[float | None, float | None] | None) -> str:
    if not bounds:
        return ""
    low, high = bounds
    return f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"


def _kinds(cls: type[Operator], params: list[ParamInfo]) -> tuple[str, ...] | None:
    declared = getattr(cls, "kinds", None)
    if isinstance(declared, tuple) and declared:
        return declared
    for p in params:
        if p.name == "kinds" and p.default not in (None, "null"):
            value = yaml.safe_load(p.default)
            if isinstance(value, list) and value:
                return tuple(str(v) for v in value)
    return None


def operator_info(cls: type[Operator]) -> OperatorInfo:
    """Everything ``omni ops`` says about one operator class, from its signature, docstring and attributes."""
    doc = _doc_of(cls)
    text = split_docstring(doc)[0]
    meanings = _meanings(cls)
    named, open_ended = _parameters(cls)
    params = []
    for name, (p, _globals) in named.items():
        annotation = "" if p.annotation is inspect.Parameter.empty else _describe(p.annotation)
        default = None if p.default is inspect.Parameter.empty else yaml_value(p.default)
        params.append(ParamInfo(name, annotation, default, meanings.get(name, ""), _range(cls.param_ranges.get(name))))
    # an __init__ taking **kwargs says what they mean with a ``**name:`` entry (count_tokens: TokenRules)
    extra = next(((k, v) for k, v in meanings.items() if k.startswith("**")), None) if open_ended else None
    purpose = _purpose(text)
    return OperatorInfo(
        name=cls.name,
        cls=f"{cls.__module__}.{cls.__qualname__}",
        purpose=purpose,
        description=text[len(text.split("\n\n", 1)[0]) :].strip(),
        params=params,
        resources=cls.resources,
        stateful=cls.stateful,
        kinds=_kinds(cls, params),
        extra=extra,
        missing=[p.name for p in params if not p.meaning],
        stale=[k for k in meanings if not k.startswith("**") and k not in named],
    )


def catalogue(imports: tuple[str, ...] = ()) -> list[OperatorInfo]:
    """Our registered operators (and those of ``imports``), sorted by name."""
    _load_operators(imports)
    packages = BUILTIN_PACKAGES + tuple(imports)
    ops = [
        cls
        for cls in registered().values()
        if any(cls.__module__ == p or cls.__module__.startswith(p + ".") for p in packages)
    ]
    return [operator_info(cls) for cls in sorted(ops, key=lambda c: c.name)]


def lookup(name: str, imports: tuple[str, ...] = ()) -> OperatorInfo:
    """One operator by name; ``unknown operator 'x'; did you mean 'y'?`` otherwise (``dedup``: it is a command)."""
    infos = {info.name: info for info in catalogue(imports)}
    if name in infos:
        return infos[name]
    if name in COMMANDS:
        raise UnknownOperator(f"{name!r} is a command, not an operator: {COMMANDS[name]}")
    close = difflib.get_close_matches(str(name), list(infos), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known: {', '.join(infos)}"
    raise UnknownOperator(f"unknown operator {name!r}; {hint}")


# ---------------------------------------------------------------- formatting


def _memory(mb: int) -> str:
    if not mb:
        return "-"
    return f"{mb / 1024:g} GiB" if mb % 1024 == 0 else f"{mb} MiB"


def resource_fields(res: Resources, stateful: bool) -> list[tuple[str, str]]:
    """``[(name, shown value)]`` in the recipe's ``resources`` spelling."""
    pool = res.concurrency
    return [
        ("cpus", f"{res.cpus:g}"),
        ("gpus", f"{res.gpus:g}"),
        ("memory", _memory(res.memory_mb)),
        ("batch_size", str(res.batch_size) if res.batch_size else "a whole unit"),
        (
            "concurrency",
            f"[{pool[0]}, {pool[1]}]" if isinstance(pool, tuple) else str(pool) if pool else "sized by the executor",
        ),
        ("runs as", "an actor pool on Ray (stateful: setup() once per actor)" if stateful else "tasks"),
    ]


def _resources_line(info: OperatorInfo) -> str:
    return ", ".join(f"{k} {v}" for k, v in resource_fields(info.resources, info.stateful))


def _short_resources(info: OperatorInfo) -> str:
    res = info.resources
    parts = [f"cpus {res.cpus:g}"]
    if res.gpus:
        parts.append(f"gpus {res.gpus:g}")
    if res.memory_mb:
        parts.append(f"memory {_memory(res.memory_mb)}")
    parts.append("actor pool" if info.stateful else "tasks")
    return ", ".join(parts)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def format_list(infos: list[OperatorInfo]) -> str:
    """``omni ops``: one block per operator (purpose, resources, parameters with defaults), then the commands."""
    out = [f"{len(infos)} operators (omni ops NAME for one in detail, omni ops --markdown for docs/operators.md)", ""]
    for info in infos:
        out.append(f"{info.name}  [{_short_resources(info)}]")
        out.append(f"    {_clip(info.purpose, 200)}")
        if info.kinds:
            out.append(f"    kinds: {', '.join(info.kinds)}")
        if info.params:
            shown = [p.name if p.required else f"{p.name}={_clip(p.default or '', 24)}" for p in info.params]
            required = [p.name for p in info.params if p.required]
            out.append(f"    params: {', '.join(shown)}" + (f"  (required: {', '.join(required)})" if required else ""))
        else:
            out.append("    params: none")
        out.append("")
    out.append("commands, not pipeline steps:")
    for name, text in COMMANDS.items():
        out.append(f"  {name}: {text}")
    return "\n".join(out)


def format_detail(info: OperatorInfo) -> str:
    """``omni ops NAME``: purpose, description, every parameter with type, default and meaning, resources."""
    out = [f"{info.name}  ({info.cls})", "", info.purpose]
    if info.description:
        out += ["", info.description]
    out += ["", "parameters:" if info.params else "parameters: none"]
    for p in info.params:
        default = "required" if p.required else f"default {p.default}"
        bounds = f", in {p.range}" if p.range else ""
        out.append(f"  {p.name}: {p.type or 'any'} ({default}{bounds})")
        out.append(f"      {p.meaning}")
    if info.extra:
        out.append(f"  {info.extra[0]}: {info.extra[1]}")
    out += ["", "resources (a step's `resources:` overrides them):"]
    out += [f"  {k}: {v}" for k, v in resource_fields(info.resources, info.stateful)]
    if info.kinds:
        out += ["", f"kinds: {', '.join(info.kinds)}"]
    return "\n".join(out)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def markdown(infos: list[OperatorInfo]) -> str:
    """``docs/operators.md``: an index table, then one section per operator."""
    out = [
        "# Operators",
        "",
        "<!-- Generated by `omni ops --markdown` from the operators' signatures, docstrings and declared",
        "     resources (pipelines/catalogue.py). Do not edit: tests/test_ops_catalogue.py checks it is current. -->",
        "",
        "Every step a recipe's `pipeline:` can name, with its parameters (`params:`) and the resources it",
        "declares (a step's `resources:` overrides them; see the README's Operators section).",
        "",
        "Commands, not pipeline steps:",
        "",
    ]
    out += [f"- `{name}`: {text}" for name, text in COMMANDS.items()]
    out += ["", "| operator | purpose | resources |", "| --- | --- | --- |"]
    out += [f"| [`{i.name}`](#{i.name}) | {_cell(i.purpose)} | {_cell(_short_resources(i))} |" for i in infos]
    for info in infos:
        out += ["", f"## {info.name}", "", _cell(info.purpose)]
        if info.description:
            out += ["", info.description]
        out += ["", f"Class: `{info.cls}`. Resources: {_cell(_resources_line(info))}."]
        if info.kinds:
            out += ["", f"Kinds: {', '.join(f'`{k}`' for k in info.kinds)}."]
        out.append("")
        if info.params:
            out += ["| parameter | type | default | meaning |", "| --- | --- | --- | --- |"]
            for p in info.params:
                default = "required" if p.required else _code(p.default or "")
                meaning = _cell(p.meaning + (f" Range: {p.range}." if p.range else ""))
                out.append(f"| `{p.name}` | {_code(p.type)} | {default} | {meaning} |")
            if info.extra:
                out.append(f"| `{info.extra[0]}` | | | {_cell(info.extra[1])} |")
        else:
            out.append("No parameters.")
    return "\n".join(out) + "\n"
