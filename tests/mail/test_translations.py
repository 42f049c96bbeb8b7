"""Translations (SPEC 14): file-template versions, the gettext catalogues of the footer and
pages, localised dates, and the Content-Language header."""

from __future__ import annotations

import email
import re
import shutil
from datetime import UTC, date, datetime
from email import policy
from pathlib import Path

import pytest
from babel.messages.pofile import read_po

from mailer.errors import HeaderInjection, TemplateError
from mailer.mail.mime import MessageBuilder
from mailer.mail.templates import Catalogue, Rendered, load_file_template
from mailer.mail.translations import SHIPPED_TEMPLATES, MessageCatalogues, date_formatter

LOCALES = SHIPPED_TEMPLATES / "_locales"
#: The languages that ship with the project (SPEC 14).
SHIPPED_LANGUAGES = ("de", "en", "ru")
#: The SPEC-named templates and the policy notice, each shipped in every language.
TRANSLATED_TEMPLATES = ("registration_confirmation", "service_alert", "legal_notice",
                        "consent_confirmation", "newsletter", "policy_update")
FOOTER_VALUES = {"topic_title": "News", "unsubscribe_url": "https://x.test/u/T",
                 "preferences_url": "https://x.test/preferences/P",
                 "postal_address": "1 Example Street"}
_PLACEHOLDER = re.compile(r"%\(\w+\)s")


def _catalog(language: str) -> list[tuple[str, str]]:
    with (LOCALES / language / "LC_MESSAGES" / "mailer.po").open("rb") as fh:
        return [(m.id, m.string) for m in read_po(fh) if m.id]


# --- the shipped gettext catalogues ----------------------------------------------------------


def test_the_template_catalogue_lists_every_message_of_the_pages_and_footer() -> None:
    # Given every {% trans %} of the pages and the footer, as Babel extracts them
    from babel.messages.extract import extract_from_dir

    found = set()
    for folder in ("_pages", "_system"):
        for _, _, message, _, _ in extract_from_dir(
                SHIPPED_TEMPLATES / folder,
                method_map=[("**.html", "jinja2"), ("**.txt", "jinja2")],
                options_map={"**": {"extensions": "jinja2.ext.i18n"}}):
            found.add(message)
    # Then mailer.pot holds exactly them, so a translator starting from it misses nothing
    with (LOCALES / "mailer.pot").open("rb") as fh:
        assert {m.id for m in read_po(fh) if m.id} == found


@pytest.mark.parametrize("language", ["de", "ru"])
def test_shipped_catalogues_translate_every_message_with_the_same_placeholders(
    language: str,
) -> None:
    with (LOCALES / "mailer.pot").open("rb") as fh:
        wanted = {m.id for m in read_po(fh) if m.id}
    entries = _catalog(language)
    assert {msgid for msgid, _ in entries} == wanted
    for msgid, text in entries:
        assert text and text != msgid, msgid
        # A placeholder lost or renamed would drop a link or a title from the page.
        assert sorted(_PLACEHOLDER.findall(text)) == sorted(_PLACEHOLDER.findall(msgid)), msgid


def test_the_shipped_languages_are_found_from_the_files() -> None:
    assert MessageCatalogues([SHIPPED_TEMPLATES]).languages == list(SHIPPED_LANGUAGES)


# --- the footer ----------------------------------------------------------------------------


@pytest.mark.parametrize(("language", "phrase", "link_text"), [
    ("en", "You receive this because you chose to receive News from us.", ">Unsubscribe</a>"),
    ("de", "Sie erhalten diese E-Mail, weil Sie News von uns abonniert haben.", ">abmelden</a>"),
    ("ru", "Вы получили это письмо, потому что подписались на «News».", ">Отписаться</a>"),
])
def test_the_footer_is_written_in_the_language_asked_for(
    language: str, phrase: str, link_text: str
) -> None:
    # Given the shipped catalogue and a rendered promotion
    catalogue = Catalogue(SHIPPED_TEMPLATES)
    body = Rendered("S", "<html><body><p>Hi</p></body></html>", "Hi\n")
    # When the footer is added in a language
    out = catalogue.footer.apply(body, FOOTER_VALUES, language)
    # Then both parts say why, in that language, with both links and the postal address
    assert phrase in out.html and phrase in out.text
    assert link_text in out.html
    for value in FOOTER_VALUES.values():
        assert value in out.text
    assert 'href="https://x.test/u/T"' in out.html
    assert "\n-- \n" in out.text  # RFC 3676 signature separator, whatever the language


def test_footer_values_stay_escaped_inside_translated_sentences() -> None:
    catalogue = Catalogue(SHIPPED_TEMPLATES)
    values = {**FOOTER_VALUES, "topic_title": "<b>News</b> & more"}
    out = catalogue.footer.apply(Rendered("S", "<p>x</p>", "x"), values, "de")
    assert "&lt;b&gt;News&lt;/b&gt; &amp; more" in out.html
    assert "<b>News</b> & more" in out.text  # plain text is not HTML


def test_a_language_is_added_with_files_alone(tmp_path: Path) -> None:
    # Given a deployment's templates folder with a French catalogue and nothing else new
    folder = tmp_path / "templates"
    shutil.copytree(SHIPPED_TEMPLATES, folder, ignore=shutil.ignore_patterns("_locales"))
    po = folder / "_locales" / "fr" / "LC_MESSAGES" / "mailer.po"
    po.parent.mkdir(parents=True)
    po.write_text(
        'msgid ""\nmsgstr "Content-Type: text/plain; charset=utf-8\\n"\n\n'
        'msgid "You receive this because you chose to receive %(topic_title)s from us."\n'
        'msgstr "Vous recevez ce message car vous avez choisi %(topic_title)s."\n',
        encoding="utf-8")
    # When a catalogue is built from that folder
    catalogue = Catalogue(folder)
    # Then French is one of its languages, next to the shipped ones it falls back on
    assert catalogue.messages.languages == ["de", "en", "fr", "ru"]
    assert catalogue.messages.language_for("fr-CA") == "fr"
    out = catalogue.footer.apply(Rendered("S", "<p>x</p>", "x"), FOOTER_VALUES, "fr")
    assert "Vous recevez ce message car vous avez choisi News." in out.text
    # And what the French file lacks is said in English, never left out
    assert "Manage your preferences: https://x.test/preferences/P" in out.text


def test_a_deployment_catalogue_overrides_single_messages(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    po = root / "_locales" / "de" / "LC_MESSAGES" / "mailer.po"
    po.parent.mkdir(parents=True)
    po.write_text('msgid ""\nmsgstr "Content-Type: text/plain; charset=utf-8\\n"\n\n'
                  'msgid "Unsubscribe:"\nmsgstr "Austragen:"\n', encoding="utf-8")
    messages = MessageCatalogues([root, SHIPPED_TEMPLATES])
    german = messages.translations("de")
    assert german.gettext("Unsubscribe:") == "Austragen:"
    assert german.gettext("Manage your preferences:") == "Einstellungen verwalten:"


# --- file templates --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSLATED_TEMPLATES)
def test_shipped_templates_have_german_and_russian_versions(name: str) -> None:
    template = Catalogue(SHIPPED_TEMPLATES).get(name)
    assert sorted(template.translations) == ["de", "ru"]
    for tag, version in template.translations.items():
        assert version.category is template.category and version.topic == template.topic
        # Each version declares its own language to the mail reader.
        assert f'<html lang="{tag}">' in (SHIPPED_TEMPLATES / name / tag / "body.html"
                                          ).read_text(encoding="utf-8")


def test_a_translation_folder_overrides_body_and_subject(tmp_path: Path) -> None:
    # Given a template with a German folder (subject in its toml) and a Russian one (none)
    folder = tmp_path / "hello"
    (folder / "de").mkdir(parents=True)
    (folder / "ru").mkdir()
    (folder / "template.toml").write_text(
        'category = "service_alert"\nsubject = "Hello {{ name }}"\nrequired = ["name"]\n')
    (folder / "body.html").write_text("<p>Hello {{ name }}</p>")
    (folder / "body.txt").write_text("Hello {{ name }}")
    (folder / "de" / "template.toml").write_text('subject = "Hallo {{ name }}"\n')
    (folder / "de" / "body.html").write_text("<p>Hallo {{ name }}</p>")
    (folder / "ru" / "body.html").write_text("<p>Привет, {{ name }}</p>")
    (folder / "notes").mkdir()  # not a language: ignored
    template = load_file_template(folder)
    assert sorted(template.translations) == ["de", "ru"]
    # When an Austrian asks, Then the German version renders, its text derived from its HTML
    german, language = template.localised("de-AT", "en")
    assert language == "de"
    rendered = german.render({"name": "Ada"})
    assert (rendered.subject, rendered.html, rendered.text.strip()) == (
        "Hallo Ada", "<p>Hallo Ada</p>", "Hallo Ada")
    # And the Russian version keeps the default subject
    russian, _ = template.localised("ru", "en")
    assert russian.render({"name": "Ada"}).subject == "Hello Ada"
    # And a French reader gets the default version, in the default language
    default, language = template.localised("fr", "en")
    assert default is template and language == "en"
    assert default.render({"name": "Ada"}).text == "Hello Ada"


def test_a_translation_may_not_read_what_its_default_does_not(tmp_path: Path) -> None:
    folder = tmp_path / "greedy"
    (folder / "de").mkdir(parents=True)
    (folder / "template.toml").write_text('category = "service_alert"\nsubject = "Hi"\n')
    (folder / "body.html").write_text("<p>{{ name }}</p>")
    (folder / "de" / "body.html").write_text("<p>{{ name }} {{ secret }}</p>")
    with pytest.raises(TemplateError, match="secret"):
        load_file_template(folder)


@pytest.mark.parametrize(("language", "expected"), [
    ("en", "March 1, 2031"), ("de", "1. März 2031"), ("ru", "1 марта 2031 г."),  # noqa: RUF001
    ("de-AT", "1. März 2031"), ("xx", "March 1, 2031"),
])
def test_dates_are_written_the_way_the_language_reads_them(language: str, expected: str
                                                            ) -> None:
    write = date_formatter(language)

    def spaced(value: object) -> str:  # CLDR: a narrow no-break space before the Russian "year"
        return " ".join(write(value).split())

    assert spaced("2031-03-01T00:00:00Z") == expected
    assert spaced(datetime(2031, 3, 1, 12, tzinfo=UTC)) == expected
    assert spaced(date(2031, 3, 1)) == expected
    assert write("not a date") == "not a date"


def test_the_policy_notice_shows_the_date_in_the_readers_language() -> None:
    template = Catalogue(SHIPPED_TEMPLATES).get("policy_update")
    data = {"version": "2031-03", "effective_at": "2031-03-01T00:00:00+00:00",
            "summary_url": None, "preferences_url": "https://x.test/preferences/P"}
    german, language = template.localised("de", "en")
    text = german.render(data, language=language).text
    assert "1. März 2031" in text and "https://x.test/preferences/P" in text


# --- Content-Language ------------------------------------------------------------------------


def _build(**extra: object) -> bytes:
    builder = MessageBuilder("Example <no-reply@example.test>", None)
    return builder.build(to_email="ada@example.org", to_name=None, subject="Hallo",
                         html="<p>Hallo</p>", text=None, message_id="<a@example.test>",
                         date=datetime(2030, 1, 1, tzinfo=UTC), **extra).data  # type: ignore[arg-type]


def test_sent_mail_names_the_language_of_its_version() -> None:
    parsed = email.message_from_bytes(_build(content_language="de-AT"), policy=policy.default)
    assert parsed["Content-Language"] == "de-AT"
    assert "Content-Language" not in email.message_from_bytes(_build(), policy=policy.default)


@pytest.mark.parametrize("bad", ["de\r\nBcc: x@example.org", "de AT", "", "dé"])
def test_content_language_is_a_tag_or_refused(bad: str) -> None:
    with pytest.raises(HeaderInjection):
        _build(content_language=bad)


def test_callers_cannot_add_a_second_content_language() -> None:
    with pytest.raises(HeaderInjection):
        _build(content_language="de", extra_headers=[("Content-Language", "en")])
