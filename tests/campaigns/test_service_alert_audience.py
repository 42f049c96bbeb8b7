"""Campaigns of service alerts (the policy notice, SPEC 14): active accounts, SPEC 2's rules."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from mailer.campaigns.audience import AudienceFilter, audience_count, decide_batch
from mailer.errors import ValidationFailed
from mailer.store.recipients import add_suppression, upsert_recipient
from mailer.store.schema import recipients
from suppression.policy import Category, Reason
from tests.units import unit_runtime


def test_the_account_filter_parses_and_round_trips() -> None:
    flt = AudienceFilter.parse({"account_active": True, "attributes": {"plan": "pro"}})
    assert (flt.account_active, dict(flt.attributes)) == (True, {"plan": "pro"})
    assert flt.as_json() == {"attributes": {"plan": "pro"}, "account_active": True}
    assert AudienceFilter.parse(None).as_json() is None
    with pytest.raises(ValidationFailed) as refused:
        AudienceFilter.parse({"account_active": "yes"})
    assert refused.value.code == "invalid_audience"


def test_a_service_alert_audience_is_the_active_accounts_decided_as_service_alerts(
    db_url: str,
) -> None:
    # Given a cohort of four: active, inactive, active but complained, active and
    # unsubscribed from all marketing
    rt = unit_runtime(db_url)
    cohort = uuid.uuid4().hex[:8]
    now = rt.clock()
    with rt.engine.begin() as conn:
        for name, active in (("ok", True), ("gone", False), ("complained", True),
                             ("unsubscribed", True)):
            address = rt.address(f"svc-{cohort}-{name}@example.org")
            upsert_recipient(conn, f"svc-{cohort}-{name}", address,
                             {"attributes": {"cohort": cohort}, "account_active": active}, now)
            if name in ("complained", "unsubscribed"):
                add_suppression(conn, address, address.hash, "marketing",
                                "complaint" if name == "complained" else "unsubscribed",
                                "test", now)
        upto = conn.execute(select(func.max(recipients.c.id))).scalar_one()
    flt = AudienceFilter.parse({"attributes": {"cohort": cohort}, "account_active": True})
    with rt.engine.connect() as conn:
        # When the audience is counted, Then the inactive account is not in it
        assert audience_count(conn, flt, upto) == 3
        rows = list(conn.execute(select(recipients.c.id, recipients.c.email,
                                        recipients.c.email_hash, recipients.c.external_id)
                                 .where(recipients.c.external_id.like(f"svc-{cohort}-%"),
                                        *flt.clauses(recipients, conn.dialect.name))
                                 .order_by(recipients.c.id)))
        # And each is decided as a service alert: no topic, unsubscribes ignored,
        # a complaint blocks (SPEC 2)
        decisions = decide_batch(rt, conn, None, rows, now, Category.SERVICE_ALERT)
    outcome = {r.external_id.rsplit("-", 1)[1]: d.reason for r, d in zip(rows, decisions,
                                                                        strict=True)}
    assert outcome == {"ok": None, "complained": Reason.COMPLAINT, "unsubscribed": None}
