"""bench/RESULTS.md: each benchmark owns one `## ` section, replaced in place when it records (stdlib only)."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record_section(section: str, path: Path = RESULTS) -> None:
    """Replace the section whose `## ` heading opens `section` (up to the next `## `), or append it."""
    heading = section.splitlines()[0]
    section = section.strip() + "\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
