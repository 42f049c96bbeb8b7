"""Every recipient in their own language (SPEC 14), end to end: API, real worker, real SMTP.

The mail, its footer, its Content-Language and the pages its links open are each checked
for a German (``de-AT``), a French (no translation: the default) and a Russian reader, and
for a message whose own ``locale`` overrides the reader's.
"""

from __future__ import annotations

import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import auth, unique_email, wait_for
from tests.scenarios.test_unsubscribe import (
    SIGNUP_EVIDENCE,
    assert_plain_page,
    delivered,
    path_of,
    preferences_url,
    recipient,
    unsubscribe_url,
    wait_final,
)
from tests.services import chromium_path, require

pytestmark = [pytest.mark.usefixtures("worker"), pytest.mark.db]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DATA = {"headline": "Spring", "body": "All about spring."}
#: What a single send carries (a campaign takes the name from each profile).
SEND = {**DATA, "name": "Ada"}
#: Phrases of the shipped footer (templates/_locales), one per language.
FOOTER = {"en": "You receive this because you chose to receive",
          "de": "Sie erhalten diese E-Mail, weil Sie",
          "ru": "Вы получили это письмо, потому что подписались на"}


def _topic_and_template(client: Any, keys: dict[str, str]) -> tuple[str, str, str]:
    """A topic with a German title, and a stored promotion in English, German and Russian."""
    tag = uuid.uuid4().hex[:8]
    topic, template = f"lang-{tag}", f"lang-{tag}"
    r = client.put(f"/v1/topics/{topic}", headers=auth(keys["marketing"]), json={
        "title": f"Spring news {tag}", "description": "Seasonal offers.",
        "translations": {"de": {"title": f"Frühlingsnews {tag}",
                                "description": "Angebote der Saison."}}})
    assert r.status_code == 201, r.text
    assert r.json()["translations"]["de"]["title"] == f"Frühlingsnews {tag}"
    r = client.put(f"/v1/templates/{template}", headers=auth(keys["marketing"]), json={
        "category": "promotion", "topic": topic, "subject": "{{ headline }}",
        "html": "<html><body><p>Hello {{ name }}: {{ body }}</p></body></html>",
        "translations": {
            "de": {"subject": "{{ headline }}: Neuheiten",
                   "html": "<html><body><p>Hallo {{ name }}: {{ body }}</p></body></html>"},
            "ru": {"subject": "{{ headline }}: новости",
                   "html": "<html><body><p>Здравствуйте, {{ name }}: {{ body }}</p>"
                           "</body></html>"},
        }})
    assert r.status_code == 201, r.text
    return tag, topic, template


def _person(client: Any, keys: dict[str, str], locale: str | None, topic: str,
            attributes: dict[str, Any] | None = None) -> dict[str, str]:
    """A registered recipient with ``locale`` who opted in to ``topic``."""
    address, external_id = unique_email("lang"), f"ext-{uuid.uuid4().hex[:12]}"
    body: dict[str, Any] = {"email": address, "name": "Ada", "attributes": attributes or {}}
    if locale is not None:
        body["locale"] = locale
    r = client.put(f"/v1/recipients/{external_id}", json=body, headers=auth(keys["recipients"]))
    assert r.status_code == 201, r.text
    r = client.post(f"/v1/recipients/{external_id}/consents", headers=auth(keys["recipients"]),
                    json={"topic": topic, "granted": True, "source": "signup_form",
                          "evidence": SIGNUP_EVIDENCE})
    assert r.status_code == 201, r.text
    return {"email": address, "external_id": external_id}


def _deliver(client: Any, keys: dict[str, str], smtp_server: Any, template: str,
             to: dict[str, str], data: dict[str, Any], locale: str | None = None,
             key: str = "marketing") -> EmailMessage:
    body: dict[str, Any] = {"template": template, "to": to, "data": data}
    if locale is not None:
        body["locale"] = locale
    r = client.post("/v1/messages", json=body, headers=auth(keys[key]))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued", r.json()
    final = wait_final(client, keys[key], r.json()["id"])
    assert final["status"] == "sent", final
    [mail] = wait_for(lambda: delivered(smtp_server, final["message_id"]))
    return mail


def _parts(mail: EmailMessage) -> tuple[str, str]:
    """HTML and text parts, each run of white space as one space (text lines are wrapped)."""
    html, text = mail.get_body(("html",)), mail.get_body(("plain",))
    assert html is not None and text is not None
    return " ".join(html.get_content().split()), " ".join(text.get_content().split())


def test_each_reader_gets_their_language_in_mail_footer_and_pages(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a translated topic and promotion, and readers in Austria, France and Russia
    tag, topic, template = _topic_and_template(client, keys)
    austrian = _person(client, keys, "de-AT", topic)
    french = _person(client, keys, "fr", topic)
    russian = _person(client, keys, "ru", topic)

    # When the Austrian is sent the promotion
    mail = _deliver(client, keys, smtp_server, template, austrian, SEND)
    html, text = _parts(mail)
    # Then it is the German version (de-AT -> de), and says so in Content-Language
    assert mail["Subject"] == "Spring: Neuheiten"
    assert mail["Content-Language"] == "de"
    assert "Hallo Ada: All about spring." in html
    # And the footer is German, with the topic's German title, in both parts
    assert f"{FOOTER['de']} Frühlingsnews {tag} von uns abonniert haben." in text
    assert f"{FOOTER['de']} Frühlingsnews {tag}" in html
    assert FOOTER["en"] not in text

    # And the pages its links open are German, declared with <html lang="de">, whatever
    # the browser's cookies or Accept-Language say (the link is the person's; SPEC 14)
    browser = {"Cookie": "lang=ru; locale=en", "Accept-Language": "ru, en;q=0.8"}
    page = client.get(path_of(unsubscribe_url(mail)), headers=browser)
    assert_plain_page(page)
    assert '<html lang="de">' in page.text and page.headers["content-language"] == "de"
    assert f"Von Frühlingsnews {tag} abmelden" in page.text
    prefs = client.get(path_of(preferences_url(mail)), headers=browser)
    assert_plain_page(prefs)
    assert '<html lang="de">' in prefs.text
    assert "Ihre E-Mail-Einstellungen" in prefs.text and "Meine Auswahl speichern" in prefs.text
    assert f"Frühlingsnews {tag}" in prefs.text and "Angebote der Saison." in prefs.text
    # (the shipped topics come with German and Russian titles: migration 0008)
    assert "Produktneuheiten" in prefs.text and "Product updates" not in prefs.text
    # And the answer to a one-click unsubscribe is German too
    done = client.post(path_of(unsubscribe_url(mail)), content=b"List-Unsubscribe=One-Click",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_plain_page(done)
    assert "Sie sind abgemeldet" in done.text
    ledger = recipient(client, keys, austrian["external_id"])["consents"]
    assert (ledger[-1]["topic"], ledger[-1]["granted"], ledger[-1]["source"]) == (
        topic, False, "one_click")

    # When the French reader is sent it, Then there is no French version: the default one,
    # in MAILER_DEFAULT_LOCALE (en), with the English footer and pages
    mail = _deliver(client, keys, smtp_server, template, french, SEND)
    html, text = _parts(mail)
    assert (mail["Subject"], mail["Content-Language"]) == ("Spring", "en")
    assert "Hello Ada: All about spring." in html
    assert f"{FOOTER['en']} Spring news {tag} from us." in text
    page = client.get(path_of(unsubscribe_url(mail)))
    assert '<html lang="en">' in page.text and f"Unsubscribe from Spring news {tag}" in page.text

    # When the Russian reader is sent it, Then mail, footer and pages are Russian (Cyrillic)
    mail = _deliver(client, keys, smtp_server, template, russian, SEND)
    html, text = _parts(mail)
    assert (mail["Subject"], mail["Content-Language"]) == ("Spring: новости", "ru")
    assert "Здравствуйте, Ada" in html and FOOTER["ru"] in text
    prefs = client.get(path_of(preferences_url(mail)))
    assert '<html lang="ru">' in prefs.text
    assert "Настройки рассылки" in prefs.text and "Сохранить выбор" in prefs.text
    assert "Обновления продуктов" in prefs.text
    # (no German title for the Russian reader: the topic's default title stands)
    assert f"Spring news {tag}" in prefs.text


def test_the_message_locale_overrides_the_readers(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given an Austrian reader
    _, topic, template = _topic_and_template(client, keys)
    austrian = _person(client, keys, "de-AT", topic)
    # When a promotion is sent with locale "ru-RU", Then it is the Russian version and footer
    mail = _deliver(client, keys, smtp_server, template, austrian, SEND, locale="ru-RU")
    _, text = _parts(mail)
    assert (mail["Subject"], mail["Content-Language"]) == ("Spring: новости", "ru")
    assert FOOTER["ru"] in text and FOOTER["de"] not in text
    # And a file template follows the same rule: a service alert with locale "en"
    alert = {"name": "Ada", "title": "Password changed", "body": "Was it you?"}
    mail = _deliver(client, keys, smtp_server, "service_alert", austrian, alert, locale="en",
                    key="transactional")
    assert mail["Content-Language"] == "en" and "Hello Ada," in _parts(mail)[1]
    # While without one the reader's German version is sent
    mail = _deliver(client, keys, smtp_server, "service_alert", austrian, alert,
                    key="transactional")
    assert mail["Content-Language"] == "de" and "Hallo Ada," in _parts(mail)[1]
    # And a locale that is no language tag is a 422, with nothing queued
    r = client.post("/v1/messages", headers=auth(keys["transactional"]), json={
        "template": "service_alert", "to": austrian, "data": alert, "locale": "de AT"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_locale"


def test_a_campaign_reaches_each_recipient_in_their_language(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
) -> None:
    from mailer.campaigns.tick import tick

    # Given three readers of one cohort, in German, Russian and French
    tag, topic, template = _topic_and_template(client, keys)
    cohort = {"cohort": f"lang-{tag}"}
    people = {locale: _person(client, keys, locale, topic, cohort)
              for locale in ("de-AT", "ru", "fr")}
    # When a campaign of the translated promotion runs
    r = client.post("/v1/campaigns", headers=auth(keys["marketing"]), json={
        "name": f"spring {tag}", "template": template, "topic": topic, "data": DATA,
        "audience": {"attributes": cohort}})
    assert r.status_code == 201, r.text
    campaign_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tick(runtime)
        shown = client.get(f"/v1/campaigns/{campaign_id}", headers=auth(keys["marketing"]))
        if shown.json()["status"] == "completed":
            break
        time.sleep(0.2)
    assert shown.json()["status"] == "completed", shown.json()
    assert shown.json()["counts"]["sent"] == 3
    # Then each got the version of their language, footer included
    by_address = {}
    for item in list(smtp_server.messages):
        import email
        from email import policy

        parsed = email.message_from_bytes(item.data, policy=policy.default)
        by_address[parsed["To"].addresses[0].addr_spec] = parsed
    expected = {"de-AT": ("de", "Spring: Neuheiten", FOOTER["de"]),
                "ru": ("ru", "Spring: новости", FOOTER["ru"]),
                "fr": ("en", "Spring", FOOTER["en"])}
    for locale, (language, subject, footer) in expected.items():
        mail = by_address[people[locale]["email"]]
        assert (mail["Content-Language"], mail["Subject"]) == (language, subject), locale
        assert footer in _parts(mail)[1]


def test_the_german_preference_centre_in_chromium(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any, tmp_path: Path
) -> None:
    require("chromium", chromium_path() is not None, "Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    from tests.conftest import serving

    # Given an Austrian reader who received the translated promotion
    tag, topic, template = _topic_and_template(client, keys)
    austrian = _person(client, keys, "de-AT", topic)
    mail = _deliver(client, keys, smtp_server, template, austrian, SEND)
    path = path_of(preferences_url(mail))
    shot = tmp_path / "preferences-de.png"
    with serving(runtime) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            # (a browser that prefers Russian and carries a language cookie changes nothing)
            context = browser.new_context(locale="ru-RU", extra_http_headers={
                "Cookie": "lang=ru"})
            page = context.new_page()
            # When they open their preference centre
            response = page.goto(base + path)
            assert response is not None and response.status == 200
            # Then the page is German: the document's language, its words and the topic
            assert page.locator("html").get_attribute("lang") == "de"
            assert page.get_by_role("heading", level=1).inner_text() == (
                "Ihre E-Mail-Einstellungen")
            assert page.get_by_role("checkbox", name=f"Frühlingsnews {tag}").is_checked()
            assert page.get_by_role("button", name="Meine Auswahl speichern").is_visible()
            page.screenshot(path=str(shot), full_page=True)
            # And saving answers in German
            page.get_by_role("checkbox", name=f"Frühlingsnews {tag}").uncheck()
            page.get_by_role("button", name="Meine Auswahl speichern").click()
            page.get_by_role("status").wait_for()
            assert "Ihre Auswahl wurde gespeichert." in page.get_by_role("status").inner_text()
            assert context.cookies() == []
        finally:
            browser.close()
    # And the screenshot shows a rendered page (a PNG of real size, not a blank)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    prefs = recipient(client, keys, austrian["external_id"])["preferences"]
    assert (prefs[topic]["subscribed"], prefs[topic]["source"]) == (False, "preference_center")
