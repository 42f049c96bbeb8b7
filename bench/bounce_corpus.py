"""Recall and wrong addresses per MTA family on the labelled bounce corpus (prints only).

Run from the project root: ``python -m bench.bounce_corpus``. For each family it prints
how many expected recipients mailer.reports named (recall), how many addresses it named
that are not labelled (wrong), and how many hard/soft labels it got wrong; then the same
for our readers without the flufl.bounce fallback and for flufl.bounce alone (when
installed), and the parser's cost per message.
"""

from __future__ import annotations

import email
import statistics
import time
from collections.abc import Callable
from email import policy

from mailer.reports import fallback, read_report
from tests.reports.corpus import Case, Tally, load_cases, score

Reader = Callable[[bytes], set[str]]


def ours(raw: bytes) -> set[str]:
    """Addresses mailer.reports names."""
    return {r.address.lower() for r in read_report(raw).recipients}


def flufl(raw: bytes) -> set[str]:
    """Addresses flufl.bounce's all_failures names (temporary and permanent)."""
    temporary, permanent = fallback.failures(email.message_from_bytes(raw, policy=policy.compat32))
    return {a.lower() for a in temporary + permanent}


def tally(cases: list[Case], reader: Reader) -> dict[str, Tally]:
    """Score a reader that returns addresses only (no hard/soft)."""
    out: dict[str, Tally] = {}
    for case in cases:
        got = reader(case.raw())
        expected = set(case.expected())
        for name in (case.family, "all"):
            t = out.setdefault(name, Tally())
            t.cases += 1
            t.expected += len(expected)
            t.found += len(expected & got)
            t.wrong += len(got - expected)
    return out


def cost_us(cases: list[Case], repeat: int = 5) -> tuple[float, float]:
    """Median and worst microseconds per message over the corpus."""
    raws = [case.raw() for case in cases]
    per_message = []
    for raw in raws:
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            read_report(raw)
            samples.append(time.perf_counter() - start)
        per_message.append(statistics.median(samples) * 1e6)
    return statistics.median(per_message), max(per_message)


def main() -> None:
    """Print the tables."""
    cases = load_cases()
    full = score((case, read_report(case.raw())) for case in cases)
    saved = fallback._ALL_FAILURES
    fallback._ALL_FAILURES = None
    try:
        alone = tally(cases, ours)
    finally:
        fallback._ALL_FAILURES = saved
    theirs = tally(cases, flufl) if fallback.available() else None

    print(f"{len(cases)} labelled messages; flufl.bounce installed: {fallback.available()}")
    header = f"{'family':<15}{'cases':>6}{'expect':>7}  {'recall':>7}{'wrong':>6}{'h/s err':>8}"
    header += f"  {'no-fallback':>11}{'wrong':>6}"
    if theirs is not None:
        header += f"  {'flufl':>7}{'wrong':>6}"
    print(header)
    for name in sorted(full, key=lambda n: (n == "all", n)):
        t = full[name]
        row = (
            f"{name:<15}{t.cases:>6}{t.expected:>7}  {t.recall:>7.3f}{t.wrong:>6}{t.wrong_class:>8}"
        )
        a = alone[name]
        row += f"  {a.recall:>11.3f}{a.wrong:>6}"
        if theirs is not None:
            f = theirs[name]
            row += f"  {f.recall:>7.3f}{f.wrong:>6}"
        print(row)
    median, worst = cost_us(cases)
    print(f"cost per message: median {median:.0f} us, worst {worst:.0f} us")


if __name__ == "__main__":
    main()
