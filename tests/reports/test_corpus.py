"""The reader against the labelled corpus: every case, then recall per MTA family."""

from __future__ import annotations

import pytest

from mailer.reports import read_report
from mailer.reports.fallback import available as fallback_available
from tests.reports.corpus import Case, load_cases, score

CASES = load_cases()

#: What the reader must reach on the labelled corpus with its own readers alone (the
#: flufl.bounce fallback adds the rest when installed); measured 0.99 when written.
MIN_RECALL = 0.97


def test_the_corpus_is_big_and_varied() -> None:
    """Given the manifest, it covers many cases and MTA families, each file present."""
    families = {case.family for case in CASES}
    assert len(CASES) >= 150
    assert len(families) >= 12
    for case in CASES:
        assert (case.raw() is not None) and case.kind in {
            "bounce",
            "complaint",
            "unsubscribe",
            "auto_reply",
            "unrecognised",
        }


@pytest.mark.parametrize("case", CASES, ids=[c.file for c in CASES])
def test_case(case: Case) -> None:
    """Given a labelled message, the reader names exactly its recipients, hard or soft."""
    if case.needs == "flufl.bounce" and not fallback_available():
        pytest.skip("only flufl.bounce's detectors read this format")

    report = read_report(case.raw())

    assert report.kind.value == case.kind
    got = {r.address.lower(): r for r in report.recipients}
    expected = case.expected()
    assert set(got) == set(expected)
    for address, label in expected.items():
        recipient = got[address]
        assert recipient.hard is bool(label.get("hard")), address
        assert recipient.policy is bool(label.get("policy")), address
        assert recipient.delayed is bool(label.get("delayed")), address
        assert not (recipient.hard and (recipient.policy or recipient.delayed))
    if case.message_id is not None:
        assert report.message_id == case.message_id
    if case.envelope_id is not None:
        assert report.envelope_id == case.envelope_id


def test_recall_and_no_wrong_address_per_family() -> None:
    """Given the whole corpus, recall is high, no address is wrong, hard/soft agree."""
    tallies = score((case, read_report(case.raw())) for case in CASES)

    overall = tallies["all"]
    assert overall.recall >= MIN_RECALL, {k: (t.recall, t.misses) for k, t in tallies.items()}
    assert overall.wrong == 0, {k: t.wrong for k, t in tallies.items() if t.wrong}
    assert overall.wrong_class == 0, {k: t.wrong_class for k, t in tallies.items() if t.wrong_class}
