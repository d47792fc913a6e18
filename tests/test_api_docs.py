"""docs/api.md's examples, run as written (in a folder holding the project's configs/)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_page_examples_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 3
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's own examples
    assert (tmp_path / "runs" / "api-demo" / "models" / "client-0" / "manifest.json").is_file()
    results = namespace["results"]
    assert results.decisions["sites_calibrated"] == 2 and results.per_client[0].threshold is not None
