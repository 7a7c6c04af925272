"""The recipe is a schema: a misspelt key, a wrong type, a size that is not > 0 or a bad operator
parameter ends in one line ``omni: error: ...`` with exit 2, before a run directory exists."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pytest
import yaml

from pipelines.cli import main
from pipelines.demo import synth_demo_recipe
from pipelines.operator import Operator, check_steps, param_problem, register
from pipelines.recipe import RecipeError, load_recipe, parse_size, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "name": "t",
    "output": "out",
    "sources": [{"name": "docs", "type": "jsonl", "path": "docs.jsonl", "unit_bytes": "1MB"}],
    "pipeline": [{"op": "validate"}],
    "shards": {"max_samples": 10, "max_bytes": "1MB"},
    "executor": {"type": "local"},
}


def _pop_rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(new, d.pop(old))


def _set(path: Sequence[str | int], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        node: Any = d
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        node[path[-1]] = value

    return edit


# (edit of BASE, the exact error line after "omni: error: ")
CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "pipline": (_pop_rename("pipeline", "pipline"), "unknown key 'pipline' in recipe (did you mean 'pipeline'?)"),
    "shard": (_pop_rename("shards", "shard"), "unknown key 'shard' in recipe (did you mean 'shards'?)"),
    "unit_byte": (
        _set(["sources", 0, "unit_byte"], "1MB"),
        "sources[0]: unknown key 'unit_byte' (did you mean 'unit_bytes'?)",
    ),
    "limits key": (
        _set(["limits", "max_txt_bytes"], 10),
        "limits: unknown key 'max_txt_bytes' (did you mean 'max_text_bytes'?)",
    ),
    "op param": (
        lambda d: d["pipeline"].append({"op": "langid", "params": {"model_pth": "lid.bin"}}),
        "pipeline[1] (langid): unknown parameter 'model_pth' (did you mean 'model_path'?)",
    ),
    "builder param": (
        lambda d: d["pipeline"].append({"op": "build_tts", "params": {"sourcez": ["docs"]}}),
        "pipeline[1] (build_tts): unknown parameter 'sourcez' (did you mean 'sources'?)",
    ),
    "op param type": (
        _set(["pipeline", 0, "params"], {"max_pixels": "lots"}),
        "pipeline[0] (validate): parameter 'max_pixels' expects int, got 'lots'",
    ),
    "op missing param": (
        lambda d: d["pipeline"].append({"op": "count_tokens"}),
        "pipeline[1] (count_tokens): missing required parameter 'tokenizer'",
    ),
    "op init check": (
        lambda d: d["pipeline"].append({"op": "keep", "params": {"preset": "goper"}}),
        "pipeline[1] (keep): unknown keep preset 'goper' (one of gopher, c4, media)",
    ),
    "unknown op": (
        _set(["pipeline", 0, "op"], "validat"),
        "pipeline[0]: unknown operator 'validat' (did you mean 'validate'?)",
    ),
    "unit_size 0": (_set(["sources", 0, "unit_size"], 0), "sources[0].unit_size: must be > 0, got 0"),
    "unit_size -3": (_set(["sources", 0, "unit_size"], -3), "sources[0].unit_size: must be > 0, got -3"),
    "unit_size str": (
        _set(["sources", 0, "unit_size"], "many"),
        "sources[0].unit_size: expected a whole number > 0, got 'many'",
    ),
    "unit_bytes 0": (_set(["sources", 0, "unit_bytes"], 0), "sources[0].unit_bytes: must be > 0, got 0"),
    "unit_bytes -1MB": (_set(["sources", 0, "unit_bytes"], "-1MB"), "sources[0].unit_bytes: must be > 0, got '-1MB'"),
    "unit_bytes lots": (
        _set(["sources", 0, "unit_bytes"], "lots"),
        "sources[0].unit_bytes: 'lots' is not a size (like 64MB, 1GiB or 4096)",
    ),
    "max_text_bytes 0": (_set(["limits", "max_text_bytes"], 0), "limits.max_text_bytes: must be > 0, got 0"),
    "max_text_bytes -5": (_set(["limits", "max_text_bytes"], -5), "limits.max_text_bytes: must be > 0, got -5"),
    "shards.max_bytes 0": (_set(["shards", "max_bytes"], 0), "shards.max_bytes: must be > 0, got 0"),
    "shards.max_samples bool": (
        _set(["shards", "max_samples"], True),
        "shards.max_samples: expected a whole number > 0, got True",
    ),
    "source type": (
        _set(["sources", 0, "type"], "json"),
        "sources[0].type: unknown type 'json' (did you mean 'jsonl'?)",
    ),
    "executor bool": (
        _set(["executor", "log_to_driver"], "yes please"),
        "executor.log_to_driver: expected true or false, got 'yes please'",
    ),
    "imports not a list": (_set(["imports"], "mymodule"), "imports: expected a list, got 'mymodule'"),
    "import missing": (
        _set(["imports"], ["no_such_module_here"]),
        "imports[0]: cannot import 'no_such_module_here': No module named 'no_such_module_here'",
    ),
    "storage hint": (
        _set(["storage", "region_name"], "eu-west-1"),
        "storage: unknown key 'region_name' (put it under client_kwargs: {region_name: ...})",
    ),
    "section type": (_set(["shards"], [1, 2]), "shards: expected a mapping, got [1, 2]"),
    "source path missing": (lambda d: d["sources"][0].pop("path"), "sources[0]: missing 'path'"),
}


# the issue's own cases run the CLI in a subprocess (no traceback can hide there); the rest call its main()
IN_SUBPROCESS = {
    "pipline",
    "shard",
    "unit_byte",
    "op param",
    "op param type",
    "unit_size 0",
    "unit_size str",
    "unit_bytes -1MB",
    "max_text_bytes 0",
    "shards.max_bytes 0",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_is_one_line_and_creates_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, message = CASES[case]
    doc = copy.deepcopy(BASE)
    edit(doc)
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    args = ["run", str(recipe), "--executor", "local", "-q"]
    if case in IN_SUBPROCESS:
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, cwd=REPO)
        status, stderr = r.returncode, r.stderr
    else:
        status, stderr = main(args), capsys.readouterr().err
    assert (status, stderr) == (2, f"omni: error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "r.yaml"], "no run directory"


def test_sizes_and_normalised_values() -> None:
    assert [parse_size(v) for v in ("64MB", "1GiB", "64k", "4096", "1.5G", " 2 kb", 7, 2.0)] == [
        64 << 20,
        1 << 30,
        64 << 10,
        4096,
        3 << 29,
        2048,
        7,
        2,
    ]
    with pytest.raises(RecipeError, match="is not a size"):
        parse_size("12 parsecs")
    doc = copy.deepcopy(BASE)
    doc["sources"][0].update(max_member_bytes="2MB", allow_paths=["../shared", "s3://bucket/media", "/abs"])
    doc["limits"] = {"max_key_bytes": "1GB", "max_json_depth": 8}
    doc["storage"] = {"endpoint_url": None, "allow_uris": ["s3://corpus/"], "config_kwargs": {"retries": {}}}
    recipe = recipe_from_dict(doc, base_dir="/recipes/here")
    assert recipe.sources[0].unit_bytes == 1 << 20
    assert recipe.sources[0].options == {
        "max_member_bytes": 2 << 20,
        "allow_paths": ["/recipes/shared", "s3://bucket/media", "/abs"],
    }
    assert (recipe.limits.max_key_bytes, recipe.limits.max_json_depth, recipe.max_text_bytes) == (1 << 30, 8, 16 << 20)
    assert recipe.allow_uris == ["s3://corpus/"] and recipe.storage == {"config_kwargs": {"retries": {}}}
    assert [s.op for s in recipe_from_dict({**doc, "pipeline": ["validate", {"op": "keep"}]}).steps] == [
        "validate",
        "keep",
    ]


def test_config_hash_is_unchanged_for_a_valid_recipe() -> None:
    """The schema normalises values; a run made before it must still resume, so this hash (computed by
    the recipe loader before the schema existed) is pinned."""
    doc = {
        "name": "pinned",
        "output": "/out",
        "sources": [
            {"name": "media", "type": "local", "path": "/data/media", "unit_size": 5},
            {"name": "docs", "type": "jsonl", "path": "/data/docs.jsonl", "unit_bytes": "700"},
            {"name": "wds", "type": "webdataset", "path": "/data/wds"},
        ],
        "pipeline": [{"op": "validate", "params": {"max_pixels": 4_000_000}}, "content_hash"],
        "shards": {"max_samples": 4, "max_bytes": "8MB", "max_inline_bytes": "1MiB"},
        "limits": {"max_text_bytes": "1MB", "max_json_depth": 16},
        "executor": {"type": "local", "num_cpus": 2, "object_store_memory": "512MB"},
        "storage": {"allow_uris": ["s3://corpus/"]},
    }
    assert recipe_from_dict(doc).config_hash() == "8c17ba2f899906fe"


def test_shipped_recipes_pass_the_schema_and_the_step_check() -> None:
    paths = sorted((REPO / "conf" / "recipes").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        check_steps(load_recipe(str(path)))
    names = ("media", "docs", "pairs", "wds", "stories", "narrated", "tokenizer")
    names += ("sft_sharegpt", "sft_llava", "sft_openai", "sft_speech")
    fake = {k: f"/data/{k}" for k in names}
    fake.update(coca_config="/data/coca.json", coca_checkpoint="/data/coca.pt")
    check_steps(recipe_from_dict(synth_demo_recipe(fake, "/out", "local")))  # what `omni demo` runs


@register
class _Ranged(Operator):
    """A test operator with every annotation shape the checker knows, and declared ranges."""

    name = "test_schema_ranged"
    param_ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {"share": (0, 1), "count": (1, None)}

    def __init__(
        self,
        share: float = 1.0,
        count: int = 1,
        mode: Literal["fast", "slow"] = "fast",
        names: list[str] | None = None,
        table: dict[str, int] | None = None,
        flag: bool = False,
        anything: Any = None,
        custom: pa.DataType | None = None,
    ) -> None:
        super().__init__()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"share": 1, "count": 3, "mode": "slow", "names": ["a"], "table": {}, "flag": True}, None),
        ({"anything": object(), "custom": "not checked", "names": None}, None),
        ({"share": 1.5}, "parameter 'share' must be in [0, 1], got 1.5"),
        ({"count": 0}, "parameter 'count' must be in [1, inf], got 0"),
        ({"count": 2.5}, "parameter 'count' expects int, got 2.5"),
        ({"count": True}, "parameter 'count' expects int, got True"),
        ({"flag": "yes"}, "parameter 'flag' expects bool, got 'yes'"),
        ({"mode": "medium"}, "parameter 'mode' expects Literal['fast', 'slow'], got 'medium'"),
        ({"names": "a"}, "parameter 'names' expects list[str] | None, got 'a'"),
        ({"names": ["a", 1]}, "parameter 'names' expects list[str] | None, got ['a', 1]"),
        ({"table": [1]}, "parameter 'table' expects dict[str, int] | None, got [1]"),
        ({"shares": 0.5}, "unknown parameter 'shares' (did you mean 'share'?)"),
        ({"zzz": 0.5}, "unknown parameter 'zzz' (known: share, count, mode, names, table, flag, anything, custom)"),
    ],
)
def test_operator_parameters_against_the_signature(params: dict[str, Any], problem: str | None) -> None:
    assert param_problem(_Ranged, params) == problem


def test_a_step_check_names_the_step_and_runs_before_the_run_directory(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["output"] = str(tmp_path / "run")
    doc["pipeline"] = [{"op": "validate"}, {"op": "test_schema_ranged", "params": {"share": -0.1}}]
    with pytest.raises(RecipeError) as e:
        check_steps(recipe_from_dict(doc, base_dir=str(tmp_path)))
    assert str(e.value) == "pipeline[1] (test_schema_ranged): parameter 'share' must be in [0, 1], got -0.1"
