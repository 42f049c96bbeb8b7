"""The preference centre: in a real Chromium against a real uvicorn, and its save rules."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import serving, unique_email
from tests.scenarios.test_unsubscribe import (
    PROMO_DATA,
    assert_plain_page,
    consent,
    link_token,
    path_of,
    preferences_url,
    recipient,
    recipient_id,
    register,
    send,
    state_counts,
    subscribed_person,
)
from tests.services import chromium_path, require

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _wanted(topics: list[str], ticked: set[str], sharing: bool | None = None) -> dict[str, Any]:
    form: dict[str, Any] = {"action": "save", "shown": list(topics), "topic": sorted(ticked)}
    if sharing is not None:
        form["shown"].append("third_party_sharing")
        if sharing:
            form["third_party_sharing"] = "yes"
    return form


@pytest.mark.usefixtures("worker")
def test_preference_centre_in_chromium_records_two_changes(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
) -> None:
    require("chromium", chromium_path() is not None, "Debian's chromium is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - depends on the machine
        require("playwright", False, "the playwright Python package is not installed")
        raise
    # Given a person who received a newsletter with a preference link in its footer
    _, external_id, mail = subscribed_person(client, keys, smtp_server, "browser")
    path = path_of(preferences_url(mail))
    before = recipient(client, keys, external_id)["consents"]
    with serving(runtime) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            page = context.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            # When they open it, untick the newsletter and tick product updates
            response = page.goto(base + path)
            assert response is not None and response.status == 200
            newsletter = page.locator("input[name=topic][value=newsletter]")
            updates = page.locator("input[name=topic][value=product_updates]")
            assert newsletter.is_checked() and not updates.is_checked()
            # (each checkbox is reachable by its visible label, as a screen reader finds it)
            assert page.get_by_role("checkbox", name="Newsletter").first.is_checked()
            newsletter.uncheck()
            updates.check()
            with page.expect_response(lambda r: r.request.method == "POST") as posted:
                page.get_by_role("button", name="Save my choices").click()
            # Then the save answers 200 in place, with no redirect and no cookie
            assert posted.value.status == 200
            assert posted.value.request.redirected_from is None
            assert "set-cookie" not in posted.value.headers
            page.get_by_role("status").wait_for()
            assert "Your choices are saved." in page.get_by_role("status").inner_text()
            assert not page.locator("input[name=topic][value=newsletter]").is_checked()
            assert page.locator("input[name=topic][value=product_updates]").is_checked()
            assert context.cookies() == []
            # And the browser fetched nothing but the page itself
            assert requested and all(url.startswith(base + "/preferences/") for url in requested)
        finally:
            browser.close()
    # And the ledger shows both changes with source preference_center, and only those
    after = recipient(client, keys, external_id)["consents"]
    new = [(e["topic"], e["granted"], e["source"]) for e in after[len(before):]]
    assert sorted(new) == [("newsletter", False, "preference_center"),
                           ("product_updates", True, "preference_center")]


def test_saving_records_only_the_topics_that_changed(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a person subscribed to the newsletter only
    external_id = register(client, keys, unique_email("prefsave"))
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    path = f"/preferences/{link_token(runtime, 'p', external_id)}"
    page = client.get(path)
    assert_plain_page(page)
    topics = [t["name"] for t in client.get("/v1/topics", headers={
        "Authorization": f"Bearer {keys['recipients']}"}).json()["topics"]]
    for topic in topics:
        assert f'value="{topic}"' in page.text  # every topic is offered
    assert "Partner companies" in page.text and "Unsubscribe from all marketing" in page.text
    before = recipient(client, keys, external_id)["consents"]
    # When they save the page unchanged
    response = client.post(path, data=_wanted(topics, {"newsletter"}, sharing=False))
    # Then nothing is written
    assert_plain_page(response)
    assert "Nothing changed." in response.text
    assert recipient(client, keys, external_id)["consents"] == before
    # When they turn on partner sharing only
    response = client.post(path, data=_wanted(topics, {"newsletter"}, sharing=True))
    # Then exactly one event is written, with evidence of the page
    after = recipient(client, keys, external_id)["consents"]
    assert len(after) == len(before) + 1
    event = after[-1]
    assert (event["topic"], event["granted"], event["source"]) == (
        "third_party_sharing", True, "preference_center")
    assert event["evidence"]["page"] == "preferences"
    assert event["policy_version"] == runtime.settings.policy_version


def test_a_topic_missing_from_the_posted_page_is_left_alone(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a person subscribed to product updates, and a page posted before that topic showed
    external_id = register(client, keys, unique_email("prefnew"))
    assert consent(client, keys, external_id, "product_updates").status_code == 201
    path = f"/preferences/{link_token(runtime, 'p', external_id)}"
    # When the form lists only the newsletter (ticked)
    client.post(path, data=_wanted(["newsletter"], {"newsletter"}))
    # Then product updates is untouched, and the newsletter is granted
    prefs = recipient(client, keys, external_id)["preferences"]
    assert prefs["product_updates"]["subscribed"] is True
    assert prefs["product_updates"]["source"] == "signup_form"
    assert prefs["newsletter"]["source"] == "preference_center"


def test_unsubscribe_all_then_a_new_choice_lifts_only_that_topic(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a person subscribed to two topics
    address = unique_email("prefall")
    external_id = register(client, keys, address)
    for topic in ("newsletter", "product_updates"):
        assert consent(client, keys, external_id, topic).status_code == 201
    path = f"/preferences/{link_token(runtime, 'p', external_id)}"
    # When they press "unsubscribe from all marketing" in the preference centre
    response = client.post(path, data={"action": "unsubscribe_all"})
    assert_plain_page(response)
    view = recipient(client, keys, external_id)
    assert {(s["scope"], s["reason"], s["source"]) for s in view["suppressions"]} == {
        ("marketing", "unsubscribed", "preference_center")}
    assert all(not p["subscribed"] for p in view["preferences"].values())
    to = {"email": address, "external_id": external_id}
    assert send(client, keys["marketing"], "newsletter", to, PROMO_DATA)["status"] == "suppressed"
    # And later tick the newsletter again on the same page (their own action)
    client.post(path, data=_wanted(["newsletter", "product_updates"], {"newsletter"}))
    # Then the newsletter reaches them again, while the suppression stays as evidence
    assert send(client, keys["marketing"], "newsletter", to, PROMO_DATA)["status"] == "queued"
    view = recipient(client, keys, external_id)
    assert view["preferences"]["product_updates"]["subscribed"] is False
    assert [s["reason"] for s in view["suppressions"]] == ["unsubscribed"]


def test_a_hard_block_is_explained_on_the_page(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a person whose address an operator blocked
    address = unique_email("prefblock")
    external_id = register(client, keys, address)
    r = client.post("/v1/suppressions", json={"email": address, "reason": "manual"},
                    headers={"Authorization": f"Bearer {keys['recipients']}"})
    assert r.status_code == 201
    # When they open the preference centre
    before = state_counts(runtime)
    token = runtime.signer.sign("p", recipient_id(runtime, external_id))
    page = client.get(f"/preferences/{token}")
    # Then it says marketing is blocked and who can lift it, and changed nothing
    assert_plain_page(page)
    assert "We currently send no marketing email" in page.text and "manual" in page.text
    assert state_counts(runtime) == before
