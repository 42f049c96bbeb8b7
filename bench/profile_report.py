"""Summarise py-spy ``--format raw`` output (collapsed stacks) written by ``run.py --profile``.

``python bench/profile_report.py FILE [--top N] [--match TEXT ...]`` prints the share of
samples per self frame (where the CPU was), and the inclusive share of every frame whose
text contains one of the ``--match`` strings (which stage it was in).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_WHERE = re.compile(r" \((?P<file>[^:()]+):\d+\)$")


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``, merging lines of one function."""
    match = _WHERE.search(frame)
    if not match:
        return frame
    name = frame[: match.start()]
    path = match.group("file")
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({tail})"


def load(path: Path) -> list[tuple[list[str], int]]:
    """The stacks (outermost first) and their sample counts."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match:
            frames = [_short(f) for f in match.group("stack").split(";")
                      if not f.startswith("process ")]
            stacks.append((frames, int(match.group("count"))))
    return stacks


def report(path: Path, top: int, matches: list[str]) -> str:
    """The text report for one file."""
    stacks = load(path)
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            if any(m in frame for m in matches):
                inclusive[frame] += count
    lines = [f"{path}: {total} samples", "  self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    if matches:
        lines.append("  inclusive time of matching frames:")
        lines += [f"    {100 * n / total:5.1f}%  {frame}"
                  for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    """Parse the command line and print the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", action="append", default=[])
    args = parser.parse_args()
    for path in args.files:
        print(report(path, args.top, args.match))


if __name__ == "__main__":
    main()
