"""Stored marketing templates in several languages (SPEC 14): checked like the default."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import auth

pytestmark = pytest.mark.db

SPRING = {
    "category": "promotion", "topic": "newsletter", "subject": "{{ headline }}",
    "html": "<p>Hello {{ name }}: {{ body }}</p>",
}
GERMAN = {"subject": "{{ headline }} (de)", "html": "<p>Hallo {{ name }}: {{ body }}</p>"}


def put(client: Any, key: str, name: str, **body: Any) -> Any:
    return client.put(f"/v1/templates/{name}", json=body, headers=auth(key))


def fresh_name() -> str:
    return f"lang-{uuid.uuid4().hex[:8]}"


def test_translations_are_stored_under_canonical_tags_and_rendered(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    from mailer.mail.stored import StoredTemplates

    name = fresh_name()
    # When marketing stores a template with an Austrian and a Russian version
    russian = {"subject": "Привет", "html": "<p>Привет, {{ name }}</p>", "text": "Привет"}
    r = put(client, keys["marketing"], name, **SPRING,
            translations={"de_at": GERMAN, "RU": russian})
    # Then they are kept under their canonical tags, with their sources
    assert r.status_code == 201, r.text
    assert sorted(r.json()["translations"]) == ["de-AT", "ru"]
    assert r.json()["translations"]["de-AT"] == {**GERMAN, "text": None}
    got = client.get(f"/v1/templates/{name}", headers=auth(keys["marketing"])).json()
    assert got["translations"] == r.json()["translations"]
    # And a worker's lookup renders the version each reader asks for
    template = StoredTemplates(runtime.engine, ttl=0)(name)
    assert template is not None
    data = {"headline": "Spring", "name": "<Ada>", "body": "B"}
    german, language = template.localised("de-AT", "en")
    rendered = german.render(data, language=language)
    assert language == "de-AT"
    assert (rendered.subject, rendered.html) == ("Spring (de)", "<p>Hallo &lt;Ada&gt;: B</p>")
    russian_version, language = template.localised("ru-RU", "en")
    assert (language, russian_version.render(data).text) == ("ru", "Привет")
    default, language = template.localised("fr", "en")
    assert (language, default.render(data).subject) == ("en", "Spring")
    # And storing it again without translations drops them (PUT replaces)
    again = put(client, keys["marketing"], name, **SPRING)
    assert again.status_code == 200 and again.json()["translations"] == {}


@pytest.mark.parametrize(("translations", "code", "locale"), [
    # the sandbox's allow-lists hold for every version
    ({"de": {"subject": "x", "html": "{{ ''.__class__ }}"}}, "unsafe_template", "de"),
    ({"de": {"subject": "x", "html": "{{ name|attr('x') }}"}}, "unsafe_template", "de"),
    # and so does the header check of the subject
    ({"de": {"subject": "x\r\nBcc: a@example.org", "html": "<p></p>"}}, "invalid_header",
     None),
    # a version may read nothing the default does not: acceptance renders only one
    ({"de": {"subject": "x", "html": "{{ secret }}"}}, "translation_variables", "de"),
    # tags are language tags, once each
    ({"not a tag": GERMAN}, "invalid_locale", "not a tag"),
    ({"de": GERMAN, "DE": GERMAN}, "invalid_translations", "de"),
])
def test_a_bad_translation_refuses_the_whole_template(
    client: Any, keys: dict[str, str], translations: dict[str, Any], code: str,
    locale: str | None,
) -> None:
    name = fresh_name()
    r = put(client, keys["marketing"], name, **SPRING, translations=translations)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code
    if locale is not None:
        assert error["details"]["locale"] == locale
    # And nothing was stored
    assert client.get(f"/v1/templates/{name}",
                      headers=auth(keys["marketing"])).status_code == 404


def test_a_translation_without_html_is_a_422(client: Any, keys: dict[str, str]) -> None:
    r = put(client, keys["marketing"], fresh_name(), **SPRING,
            translations={"de": {"subject": "x"}})
    assert r.status_code == 422


def test_file_templates_list_their_translations(client: Any, keys: dict[str, str]) -> None:
    got = client.get("/v1/templates/newsletter", headers=auth(keys["marketing"])).json()
    assert got["source"] == "file" and got["translations"] == ["de", "ru"]
