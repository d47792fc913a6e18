"""Write one named section of docs/benchmarks.md (other sections are kept)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every section below was written by the benchmark named in its heading
(`make bench` runs them all; `python bench/<script>.py` one). Each records the
command, the machine and the date. Speed comparisons are ratios measured side by
side in the same run, since machines are noisy.
"""


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def write_section(name: str, title: str, command: str, body: str) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = _dt.date.today().isoformat()
    block = (f"<!-- begin:{name} -->\n## {title}\n\n`{command}` — {machine()}, {stamp}\n\n"
             f"{body.strip()}\n<!-- end:{name} -->")
    pattern = re.compile(rf"<!-- begin:{name} -->.*?<!-- end:{name} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
