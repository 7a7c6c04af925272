"""docs/python-api.md's examples run as written: every ```python block, in order, as one script, in
an empty directory, in a fresh interpreter (so nothing this test process imported helps them), and
never importing Ray (the page promises the operator and the local executor run without it). A block
that starts with ``# needs a trained run`` (speaking with OmniGenerator) is only compiled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


NEEDS_RUN = "# needs a trained run"  # a block's first line: compiled only (test_every_block_is_valid_python)


def test_python_api_examples_run(tmp_path: Path) -> None:
    blocks = [b for b in python_blocks(PAGE.read_text(encoding="utf-8")) if not b.startswith(NEEDS_RUN)]
    assert len(blocks) >= 5, "the page lost its examples"
    script = "\n\n".join(f"# ---- block {i + 1}\n{b}" for i, b in enumerate(blocks))
    script += '\n\nimport sys\n\nassert not [m for m in sys.modules if m.split(".")[0] == "ray"], "Ray was imported"\n'
    (tmp_path / "examples.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "examples.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "samples packed" in proc.stdout and "'too short'" in proc.stdout
    assert (tmp_path / "runs" / "notes" / "shards" / "manifest.json").is_file()


def test_every_block_is_valid_python() -> None:
    for i, block in enumerate(python_blocks(PAGE.read_text(encoding="utf-8"))):
        compile(block, f"docs/python-api.md block {i + 1}", "exec")
