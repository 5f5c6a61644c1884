"""bench/RESULTS.md: each benchmark owns one `## ` section, replaced in place when it records (stdlib only)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_name() -> str:
    """The processor's model name, for the machine line of a recorded section."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or "unknown CPU"


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
