"""The policy matrix of SPEC section 2: every category x every recipient state, written out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suppression.consent import THIRD_PARTY_SHARING, ConsentEvent, current
from suppression.policy import (
    ALLOWED,
    BLOCKING,
    PRECEDENCE,
    Category,
    Decision,
    Limits,
    Reason,
    RecipientState,
    Suppression,
    Topic,
    decide,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
NEWSLETTER = Topic("newsletter")
PARTNER = Topic("partner_offers", third_party=True)


def grant(topic: str, at: datetime, source: str = "double_opt_in") -> ConsentEvent:
    """A grant event in the ledger."""
    return ConsentEvent(topic=topic, granted=True, occurred_at=at, source=source)


def revoke(topic: str, at: datetime, source: str = "unsubscribe_link") -> ConsentEvent:
    """A revoke event in the ledger."""
    return ConsentEvent(topic=topic, granted=False, occurred_at=at, source=source)


OPTED_IN = (grant("newsletter", NOW - 30 * DAY),)

# Named recipient states. ``prior_sends`` are earlier sends *of the category being decided*,
# so one state reads as "one earlier registration" in the registration column and as "one
# earlier alert" in the service-alert column.
STATES: dict[str, RecipientState] = {
    "clean_no_account": RecipientState(),
    "clean_with_account": RecipientState(account_active=True),
    "opted_in": RecipientState(account_active=True, consents=OPTED_IN),
    "opted_in_without_account": RecipientState(consents=OPTED_IN),
    "opted_in_other_topic_only": RecipientState(
        account_active=True, consents=(grant("product_updates", NOW - DAY),)
    ),
    "opted_in_then_revoked": RecipientState(
        account_active=True, consents=(*OPTED_IN, revoke("newsletter", NOW - DAY))
    ),
    "revoked_then_regranted": RecipientState(
        account_active=True,
        consents=(
            revoke("newsletter", NOW - 10 * DAY),
            grant("newsletter", NOW - DAY, "preference_center"),
        ),
    ),
    "revoked_tie_same_instant": RecipientState(
        account_active=True,
        consents=(revoke("newsletter", NOW - DAY), grant("newsletter", NOW - DAY)),
    ),
    "hard_bounced": RecipientState(
        account_active=True, consents=OPTED_IN, suppressions=(Suppression("all", "hard_bounce"),)
    ),
    "hard_bounce_marketing_scope": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        suppressions=(Suppression("marketing", "hard_bounce"),),
    ),
    "soft_bounce_limited": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        suppressions=(Suppression("all", "soft_bounce_limit", expires_at=NOW + 20 * DAY),),
    ),
    "soft_bounce_expired": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        # Expiry at exactly "now" has passed: the entry no longer applies.
        suppressions=(Suppression("all", "soft_bounce_limit", expires_at=NOW),),
    ),
    "complained": RecipientState(
        account_active=True,
        consents=(*OPTED_IN, revoke("newsletter", NOW - DAY, "complaint")),
        suppressions=(Suppression("marketing", "complaint", created_at=NOW - DAY),),
    ),
    "complained_scope_all": RecipientState(
        account_active=True, consents=OPTED_IN, suppressions=(Suppression("all", "complaint"),)
    ),
    "manual_all": RecipientState(
        account_active=True, consents=OPTED_IN, suppressions=(Suppression("all", "manual"),)
    ),
    "manual_marketing": RecipientState(
        account_active=True, consents=OPTED_IN, suppressions=(Suppression("marketing", "manual"),)
    ),
    "manual_all_expired": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        suppressions=(Suppression("all", "manual", expires_at=NOW - timedelta(seconds=1)),),
    ),
    "unsubscribed_all": RecipientState(
        account_active=True,
        consents=(*OPTED_IN, revoke("newsletter", NOW - 2 * DAY)),
        suppressions=(Suppression("marketing", "unsubscribed", created_at=NOW - 2 * DAY),),
    ),
    "unsubscribed_scope_all": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        suppressions=(Suppression("all", "unsubscribed"),),
    ),
    "unsubscribed_all_then_own_opt_in": RecipientState(
        account_active=True,
        consents=(
            revoke("newsletter", NOW - 10 * DAY),
            grant("newsletter", NOW - DAY, "preference_center"),
        ),
        suppressions=(Suppression("marketing", "unsubscribed", created_at=NOW - 10 * DAY),),
    ),
    "unsubscribed_all_then_operator_grant": RecipientState(
        account_active=True,
        consents=(grant("newsletter", NOW - DAY, "import"),),
        suppressions=(Suppression("marketing", "unsubscribed", created_at=NOW - 10 * DAY),),
    ),
    "unsubscribed_all_after_own_opt_in": RecipientState(
        account_active=True,
        consents=(grant("newsletter", NOW - 20 * DAY, "preference_center"),),
        suppressions=(Suppression("marketing", "unsubscribed", created_at=NOW - 10 * DAY),),
    ),
    "erased": RecipientState(suppressions=(Suppression("marketing", "erased"),)),
    "erased_then_registered_again": RecipientState(
        account_active=True,
        consents=(grant("newsletter", NOW - DAY, "signup_form"),),
        suppressions=(Suppression("marketing", "erased", created_at=NOW - 10 * DAY),),
    ),
    "invalid": RecipientState(
        address_valid=False,
        account_active=True,
        consents=OPTED_IN,
        suppressions=(Suppression("all", "hard_bounce"),),
    ),
    "one_prior_send": RecipientState(account_active=True, prior_sends=(NOW - DAY,)),
    "two_prior_sends_in_window": RecipientState(
        account_active=True, prior_sends=(NOW - DAY, NOW - 2 * DAY)
    ),
    "three_prior_sends_in_window": RecipientState(
        account_active=True,
        prior_sends=(NOW - timedelta(hours=1), NOW - 3 * DAY, NOW - 6 * DAY),
    ),
    "three_prior_sends_one_just_inside": RecipientState(
        account_active=True,
        prior_sends=(NOW - timedelta(hours=1), NOW - 3 * DAY, NOW - 7 * DAY + timedelta(seconds=1)),
    ),
    "three_prior_sends_one_on_window_edge": RecipientState(
        account_active=True,
        # Exactly now - 7 days has left the rolling window.
        prior_sends=(NOW - timedelta(hours=1), NOW - 3 * DAY, NOW - 7 * DAY),
    ),
    "four_prior_sends_two_inside": RecipientState(
        account_active=True,
        prior_sends=(NOW - DAY, NOW - 2 * DAY, NOW - 8 * DAY, NOW - 9 * DAY),
    ),
    "four_prior_sends_outside_window": RecipientState(
        account_active=True,
        prior_sends=(NOW - 8 * DAY, NOW - 9 * DAY, NOW - 10 * DAY, NOW - 30 * DAY),
    ),
    "three_prior_sends_without_account": RecipientState(
        prior_sends=(NOW - DAY, NOW - 2 * DAY, NOW - 3 * DAY),
    ),
    "third_party_with_sharing": RecipientState(
        account_active=True,
        consents=(
            *OPTED_IN,
            grant("partner_offers", NOW - 5 * DAY),
            grant(THIRD_PARTY_SHARING, NOW - 5 * DAY, "preference_center"),
        ),
    ),
    "third_party_without_sharing": RecipientState(
        account_active=True, consents=(*OPTED_IN, grant("partner_offers", NOW - 5 * DAY))
    ),
    "third_party_sharing_revoked": RecipientState(
        account_active=True,
        consents=(
            *OPTED_IN,
            grant("partner_offers", NOW - 5 * DAY),
            grant(THIRD_PARTY_SHARING, NOW - 5 * DAY, "preference_center"),
            revoke(THIRD_PARTY_SHARING, NOW - DAY, "preference_center"),
        ),
    ),
    "partner_revoked_sharing_granted": RecipientState(
        account_active=True,
        consents=(
            grant("partner_offers", NOW - 5 * DAY),
            revoke("partner_offers", NOW - DAY),
            grant(THIRD_PARTY_SHARING, NOW - 5 * DAY, "preference_center"),
        ),
    ),
    "sharing_consent_only": RecipientState(
        account_active=True,
        consents=(grant(THIRD_PARTY_SHARING, NOW - DAY, "preference_center"),),
    ),
    "complaint_and_hard_bounce": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        suppressions=(Suppression("all", "complaint"), Suppression("all", "hard_bounce")),
    ),
    "erased_and_hard_bounced": RecipientState(
        suppressions=(Suppression("all", "hard_bounce"), Suppression("marketing", "erased")),
    ),
    "complaint_and_manual": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        suppressions=(Suppression("marketing", "complaint"), Suppression("all", "manual")),
    ),
    "soft_bounce_and_unsubscribed": RecipientState(
        account_active=True,
        consents=OPTED_IN,
        suppressions=(
            Suppression("marketing", "unsubscribed"),
            Suppression("all", "soft_bounce_limit", expires_at=NOW + DAY),
        ),
    ),
    "unsubscribed_and_complained": RecipientState(
        account_active=True,
        suppressions=(
            Suppression("marketing", "unsubscribed"),
            Suppression("marketing", "complaint"),
        ),
    ),
    "complained_and_three_prior_sends": RecipientState(
        account_active=True,
        suppressions=(Suppression("marketing", "complaint"),),
        prior_sends=(NOW - DAY, NOW - 2 * DAY, NOW - 3 * DAY),
    ),
}

OK = None
INVALID = Reason.INVALID_ADDRESS
ERASED = Reason.ERASED
HARD = Reason.HARD_BOUNCE
MANUAL = Reason.MANUAL
COMPL = Reason.COMPLAINT
SOFT = Reason.SOFT_BOUNCE_LIMIT
UNSUB = Reason.UNSUBSCRIBED
NO_ACCT = Reason.NO_ACCOUNT
NO_CONS = Reason.NO_CONSENT
NO_3P = Reason.THIRD_PARTY_NOT_ALLOWED
CAP = Reason.FREQUENCY_CAP
SENT = Reason.ALREADY_SENT

# The columns: each is a (category, topic) the policy is asked about.
COLUMNS: tuple[tuple[Category, Topic | None], ...] = (
    (Category.REGISTRATION_CONFIRMATION, None),
    (Category.SERVICE_ALERT, None),
    (Category.LEGAL_NOTICE, None),
    (Category.PROMOTION, NEWSLETTER),
    (Category.PROMOTION, PARTNER),
)

# Expected outcome per state and column (OK means allowed; "partner" is a third-party topic),
# written out by hand from the SPEC matrix, never computed.
Expected = Reason | None
TABLE: dict[str, tuple[Expected, Expected, Expected, Expected, Expected]] = {
    # state                                  register  alert     legal     newsletter partner
    "clean_no_account":                     (OK,       NO_ACCT,  OK,       NO_CONS,  NO_CONS),
    "clean_with_account":                   (OK,       OK,       OK,       NO_CONS,  NO_CONS),
    "opted_in":                             (OK,       OK,       OK,       OK,       NO_CONS),
    "opted_in_without_account":             (OK,       NO_ACCT,  OK,       OK,       NO_CONS),
    "opted_in_other_topic_only":            (OK,       OK,       OK,       NO_CONS,  NO_CONS),
    "opted_in_then_revoked":                (OK,       OK,       OK,       UNSUB,    NO_CONS),
    "revoked_then_regranted":               (OK,       OK,       OK,       OK,       NO_CONS),
    "revoked_tie_same_instant":             (OK,       OK,       OK,       UNSUB,    NO_CONS),
    "hard_bounced":                         (HARD,     HARD,     HARD,     HARD,     HARD),
    "hard_bounce_marketing_scope":          (OK,       OK,       OK,       HARD,     HARD),
    "soft_bounce_limited":                  (OK,       OK,       OK,       SOFT,     SOFT),
    "soft_bounce_expired":                  (OK,       OK,       OK,       OK,       NO_CONS),
    "complained":                           (OK,       COMPL,    OK,       COMPL,    COMPL),
    "complained_scope_all":                 (OK,       COMPL,    OK,       COMPL,    COMPL),
    "manual_all":                           (MANUAL,   MANUAL,   MANUAL,   MANUAL,   MANUAL),
    "manual_marketing":                     (OK,       OK,       OK,       MANUAL,   MANUAL),
    "manual_all_expired":                   (OK,       OK,       OK,       OK,       NO_CONS),
    "unsubscribed_all":                     (OK,       OK,       OK,       UNSUB,    UNSUB),
    "unsubscribed_scope_all":               (OK,       OK,       OK,       UNSUB,    UNSUB),
    "unsubscribed_all_then_own_opt_in":     (OK,       OK,       OK,       OK,       UNSUB),
    "unsubscribed_all_then_operator_grant": (OK,       OK,       OK,       UNSUB,    UNSUB),
    "unsubscribed_all_after_own_opt_in":    (OK,       OK,       OK,       UNSUB,    UNSUB),
    "erased":                               (OK,       NO_ACCT,  OK,       ERASED,   ERASED),
    "erased_then_registered_again":         (OK,       OK,       OK,       ERASED,   ERASED),
    "invalid":                              (INVALID,  INVALID,  INVALID,  INVALID,  INVALID),
    "one_prior_send":                       (SENT,     OK,       OK,       NO_CONS,  NO_CONS),
    "two_prior_sends_in_window":            (SENT,     OK,       OK,       NO_CONS,  NO_CONS),
    "three_prior_sends_in_window":          (SENT,     CAP,      OK,       NO_CONS,  NO_CONS),
    "three_prior_sends_one_just_inside":    (SENT,     CAP,      OK,       NO_CONS,  NO_CONS),
    "three_prior_sends_one_on_window_edge": (SENT,     OK,       OK,       NO_CONS,  NO_CONS),
    "four_prior_sends_two_inside":          (SENT,     OK,       OK,       NO_CONS,  NO_CONS),
    "four_prior_sends_outside_window":      (SENT,     OK,       OK,       NO_CONS,  NO_CONS),
    "three_prior_sends_without_account":    (SENT,     NO_ACCT,  OK,       NO_CONS,  NO_CONS),
    "third_party_with_sharing":             (OK,       OK,       OK,       OK,       OK),
    "third_party_without_sharing":          (OK,       OK,       OK,       OK,       NO_3P),
    "third_party_sharing_revoked":          (OK,       OK,       OK,       OK,       NO_3P),
    "partner_revoked_sharing_granted":      (OK,       OK,       OK,       NO_CONS,  UNSUB),
    "sharing_consent_only":                 (OK,       OK,       OK,       NO_CONS,  NO_CONS),
    "complaint_and_hard_bounce":            (HARD,     HARD,     HARD,     HARD,     HARD),
    "erased_and_hard_bounced":              (HARD,     HARD,     HARD,     ERASED,   ERASED),
    "complaint_and_manual":                 (MANUAL,   MANUAL,   MANUAL,   MANUAL,   MANUAL),
    "soft_bounce_and_unsubscribed":         (OK,       OK,       OK,       SOFT,     SOFT),
    "unsubscribed_and_complained":          (OK,       COMPL,    OK,       COMPL,    COMPL),
    "complained_and_three_prior_sends":     (SENT,     COMPL,    OK,       COMPL,    COMPL),
}  # fmt: skip

CELLS = [
    pytest.param(
        state, category, topic, expected, id=f"{state}-{category}-{topic.name if topic else '-'}"
    )
    for state, row in TABLE.items()
    for (category, topic), expected in zip(COLUMNS, row, strict=True)
]


def test_table_covers_every_state_and_every_category() -> None:
    # Given the named states and the expectation table
    # Then each state has exactly one row and every category has a column.
    assert set(TABLE) == set(STATES)
    assert {category for category, _ in COLUMNS} == set(Category)


@pytest.mark.parametrize(("state", "category", "topic", "expected"), CELLS)
def test_policy_matrix(
    state: str, category: Category, topic: Topic | None, expected: Reason | None
) -> None:
    # Given a named recipient state, When the policy decides a message of this category,
    # Then the outcome is the one written in the table.
    decision = decide(category, topic, STATES[state], NOW)
    if expected is None:
        assert decision == Decision(allowed=True)
        assert decision is ALLOWED
    else:
        assert decision == Decision(allowed=False, reason=expected)


def test_every_reason_is_produced_by_some_cell() -> None:
    # Given the table, Then each reason code of the API contract appears in at least one cell.
    produced = {reason for row in TABLE.values() for reason in row if reason is not None}
    assert produced == set(Reason)


def test_promotion_without_topic_is_a_programming_error() -> None:
    # Given a promotion with no topic, When deciding, Then it raises rather than guessing.
    with pytest.raises(ValueError, match="topic"):
        decide(Category.PROMOTION, None, STATES["opted_in"], NOW)


def test_unknown_category_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="category"):
        decide("newsletter_blast", None, STATES["opted_in"], NOW)  # type: ignore[arg-type]


def test_plain_string_category_is_accepted() -> None:
    # Given a category read back from the database as a plain string
    decision = decide("service_alert", None, STATES["three_prior_sends_in_window"], NOW)  # type: ignore[arg-type]
    # Then it is treated like the enum member.
    assert decision == Decision.deny(Reason.FREQUENCY_CAP)


def test_configured_service_alert_limits_apply() -> None:
    # Given a limit of one alert per hour
    limits = Limits(service_alert_limit=1, service_alert_window=timedelta(hours=1))
    recent = RecipientState(account_active=True, prior_sends=(NOW - timedelta(minutes=59),))
    older = RecipientState(account_active=True, prior_sends=(NOW - timedelta(minutes=61),))
    # Then one alert 59 minutes ago blocks the next, one 61 minutes ago does not.
    assert decide(Category.SERVICE_ALERT, None, recent, NOW, limits).reason == CAP
    assert decide(Category.SERVICE_ALERT, None, older, NOW, limits) is ALLOWED


def test_a_send_stamped_slightly_in_the_future_still_counts_against_the_cap() -> None:
    # Given three alerts, one stamped a second ahead of this worker's clock (another host)
    state = RecipientState(
        account_active=True,
        prior_sends=(NOW - DAY, NOW - 2 * DAY, NOW + timedelta(seconds=1)),
    )
    # Then the cap still holds.
    assert decide(Category.SERVICE_ALERT, None, state, NOW).reason == CAP


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(service_alert_limit=-1)
    with pytest.raises(ValueError):
        Limits(service_alert_window=timedelta(0))


def test_decision_is_allowed_xor_reason() -> None:
    assert Decision(allowed=True) == ALLOWED
    assert Decision.ALLOWED is ALLOWED
    assert Decision.deny(Reason.MANUAL) == Decision(allowed=False, reason=Reason.MANUAL)
    assert Decision.deny(Reason.MANUAL) is Decision.deny(Reason.MANUAL)
    with pytest.raises(ValueError):
        Decision(allowed=True, reason=Reason.MANUAL)
    with pytest.raises(ValueError):
        Decision(allowed=False)


def test_suppression_rejects_unknown_scope_and_reason() -> None:
    # An entry the policy cannot read must fail loudly, not silently stop blocking.
    with pytest.raises(ValueError):
        Suppression("transactional", "manual")
    with pytest.raises(ValueError):
        Suppression("all", "no_consent")


def test_blocking_table_matches_the_spec_matrix() -> None:
    # Given the SPEC 2 "blocked by" column, written out
    expected = {
        Category.REGISTRATION_CONFIRMATION: {"hard_bounce", "manual"},
        Category.SERVICE_ALERT: {"hard_bounce", "manual", "complaint"},
        Category.LEGAL_NOTICE: {"hard_bounce", "manual"},
        Category.PROMOTION: {
            "erased",
            "hard_bounce",
            "manual",
            "complaint",
            "soft_bounce_limit",
            "unsubscribed",
        },
    }
    assert expected == BLOCKING


def test_precedence_orders_every_reason_once() -> None:
    assert sorted(PRECEDENCE) == sorted(Reason)
    assert len(PRECEDENCE) == len(set(PRECEDENCE))


# --- properties over random states ------------------------------------------------------

_OFFSETS = st.sampled_from(
    [-30 * DAY, -7 * DAY, -6 * DAY, -DAY, -timedelta(seconds=1), timedelta(0), DAY, 30 * DAY]
)
_TIMES = _OFFSETS.map(lambda offset: NOW + offset)
_TOPIC_NAMES = st.sampled_from(["newsletter", "partner_offers", THIRD_PARTY_SHARING])
_SOURCES = st.sampled_from(["signup_form", "preference_center", "unsubscribe_link", "import"])

_consents = st.builds(
    ConsentEvent, topic=_TOPIC_NAMES, granted=st.booleans(), occurred_at=_TIMES, source=_SOURCES
)
_suppressions = st.builds(
    Suppression,
    scope=st.sampled_from(["all", "marketing"]),
    reason=st.sampled_from(
        ["hard_bounce", "soft_bounce_limit", "complaint", "unsubscribed", "manual", "erased"]
    ),
    expires_at=st.none() | _TIMES,
    created_at=st.none() | _TIMES,
)
_states = st.builds(
    RecipientState,
    address_valid=st.booleans(),
    account_active=st.booleans(),
    suppressions=st.lists(_suppressions, max_size=4).map(tuple),
    consents=st.lists(_consents, max_size=6).map(tuple),
    prior_sends=st.lists(_TIMES, max_size=5).map(tuple),
)

# The reasons each category can ever give, read off the SPEC 2 matrix.
POSSIBLE = {
    Category.REGISTRATION_CONFIRMATION: {INVALID, HARD, MANUAL, SENT},
    Category.SERVICE_ALERT: {INVALID, HARD, MANUAL, COMPL, NO_ACCT, CAP},
    Category.LEGAL_NOTICE: {INVALID, HARD, MANUAL},
    Category.PROMOTION: {INVALID, ERASED, HARD, MANUAL, COMPL, SOFT, UNSUB, NO_CONS, NO_3P},
}


@settings(max_examples=400, deadline=None)
@given(
    category=st.sampled_from(list(Category)),
    topic=st.sampled_from([NEWSLETTER, PARTNER]),
    state=_states,
)
def test_decide_is_total_and_only_gives_reasons_the_matrix_allows(
    category: Category, topic: Topic, state: RecipientState
) -> None:
    # Given any recipient state, When deciding, Then it never raises, the result is allowed
    # xor carries one reason, and that reason is one the category can be blocked by.
    decision = decide(category, topic, state, NOW)
    assert decision.allowed != (decision.reason is not None)
    if decision.reason is not None:
        assert decision.reason in POSSIBLE[category]
    if category == Category.PROMOTION and decision.allowed:
        # Marketing consent is never implied: an allowed promotion has a current grant.
        latest = current(state.consents, topic.name)
        assert latest is not None and latest.granted


@settings(max_examples=200, deadline=None)
@given(
    category=st.sampled_from(list(Category)),
    state=_states,
    data=st.data(),
)
def test_decision_does_not_depend_on_the_order_of_entries(
    category: Category, state: RecipientState, data: st.DataObject
) -> None:
    # Given the same state with its suppressions, consents and sends in another order
    shuffled = RecipientState(
        address_valid=state.address_valid,
        account_active=state.account_active,
        suppressions=tuple(data.draw(st.permutations(state.suppressions))),
        consents=tuple(data.draw(st.permutations(state.consents))),
        prior_sends=tuple(data.draw(st.permutations(state.prior_sends))),
    )
    # Then the decision, including which reason is reported, is the same.
    assert decide(category, PARTNER, shuffled, NOW) == decide(category, PARTNER, state, NOW)
