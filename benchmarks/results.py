"""benchmarks/RESULTS.md: every benchmark script owns one marked section.

A script rewrites only the text between its own `<!-- NAME:begin -->` and
`<!-- NAME:end -->` markers, so running one benchmark never erases the
figures of another. Notes written by hand go after a section's end marker,
where a rerun leaves them.
"""

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name, text, title=None):
    """Replaces (or appends) the section NAME of RESULTS.md with `text`.

    Args:
        name: the section's marker name, e.g. "throughput".
        text: the section's Markdown body.
        title: an optional "## title" line put above the body.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = f"## {title}\n\n{text.rstrip()}" if title else text.rstrip()
    section = f"{begin}\n{body}\n{end}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old)
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(new)
