"""docs/BENCHMARKS.md is shared by several benchmark scripts: each rewrites only its own section."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (speed depends on it: the machines that run the benchmarks vary)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def replace_section(path: Path, start: str, end: str, text: str) -> None:
    """Put `text` between the `start` and `end` markers of `path`, appending the section if absent."""
    current = path.read_text() if path.is_file() else "# Benchmarks\n"
    section = f"{start}\n{text}\n{end}"
    if start in current:
        before, rest = current.split(start, 1)
        current = before + section + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current)
