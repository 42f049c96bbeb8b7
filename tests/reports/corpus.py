"""The labelled bounce corpus in tests/fixtures/bounces: loading and scoring."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailer.reports import Report

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "bounces"


@dataclass(frozen=True)
class Case:
    """One labelled message: what the reader must say about it."""

    file: str
    kind: str
    recipients: tuple[dict[str, Any], ...]
    message_id: str | None = None
    envelope_id: str | None = None
    needs: str | None = None

    @property
    def family(self) -> str:
        """The MTA family: the folder the file sits in."""
        return self.file.split("/", 1)[0]

    def raw(self) -> bytes:
        """The message bytes."""
        return (CORPUS / self.file).read_bytes()

    def expected(self) -> dict[str, dict[str, Any]]:
        """Expected recipients by lower-cased address."""
        return {r["address"].lower(): r for r in self.recipients}


def load_cases() -> list[Case]:
    """Read manifest.json."""
    data = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
    return [
        Case(
            file=c["file"],
            kind=c["kind"],
            recipients=tuple(c["recipients"]),
            message_id=c.get("message_id"),
            envelope_id=c.get("envelope_id"),
            needs=c.get("needs"),
        )
        for c in data["cases"]
    ]


@dataclass
class Tally:
    """Recall and wrong addresses over a set of cases."""

    expected: int = 0
    found: int = 0
    wrong: int = 0
    wrong_class: int = 0
    cases: int = 0
    misses: list[str] = field(default_factory=list)

    @property
    def recall(self) -> float:
        """Share of expected recipients the reader named."""
        return self.found / self.expected if self.expected else 1.0


def score(results: Iterable[tuple[Case, Report]]) -> dict[str, Tally]:
    """Tally recall, wrong addresses and wrong hard/soft per family (and "all")."""
    tallies: dict[str, Tally] = {}
    for case, report in results:
        for name in (case.family, "all"):
            tally = tallies.setdefault(name, Tally())
            expected = case.expected()
            got = {r.address.lower(): r for r in report.recipients}
            tally.cases += 1
            tally.expected += len(expected)
            tally.found += len(expected.keys() & got.keys())
            tally.wrong += len(got.keys() - expected.keys())
            for address in expected.keys() & got.keys():
                if bool(expected[address].get("hard")) != got[address].hard:
                    tally.wrong_class += 1
            if expected.keys() - got.keys() and name != "all":
                tally.misses.append(case.file)
    return tallies
