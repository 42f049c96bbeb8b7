"""Which language version a person gets (SPEC 14): the pure rule of mailer.mail.locales."""

from __future__ import annotations

import pytest

from mailer.mail.locales import (
    Choice,
    choose,
    is_valid,
    language_of,
    normalise,
    pick,
    requested,
    translated,
)


@pytest.mark.parametrize(("raw", "canonical"), [
    ("de", "de"),
    ("DE", "de"),
    ("de-at", "de-AT"),
    ("de_AT", "de-AT"),
    (" pt-br ", "pt-BR"),
    ("zh-hant-tw", "zh-Hant-TW"),
    ("sr-Latn", "sr-Latn"),
    ("es-419", "es-419"),
    ("", None),
    ("   ", None),
    ("d", None),
    ("de-", None),
    ("de--AT", None),
    ("1de", None),
    ("de AT", None),
    ("de-ÄT", None),
    ("x" * 36, None),
    ("images", None),
    ("de-" + "a" * 9, None),
    (None, None),
])
def test_tags_are_spelled_canonically_or_refused(raw: str | None, canonical: str | None) -> None:
    # Given a tag as a profile or a caller wrote it, Then it reads as RFC 5646 spells it
    assert normalise(raw) == canonical
    if raw is not None:
        assert is_valid(raw) is (canonical is not None)


def test_the_language_of_a_tag_is_its_first_subtag() -> None:
    assert language_of("de-AT") == "de"
    assert language_of("zh-Hant-TW") == "zh"
    assert language_of("ru") == "ru"


def test_the_message_locale_wins_over_the_recipients() -> None:
    # Given a German recipient and a message that asks for Russian, Then Russian is asked for
    assert requested("ru", "de-AT") == "ru"
    # And without a message locale, the recipient's is asked for
    assert requested(None, "de_at") == "de-AT"
    # And a malformed message locale is no locale: the recipient's counts
    assert requested("not a tag", "de") == "de"
    assert requested(None, None) is None


@pytest.mark.parametrize(("available", "wanted", "default", "expected"), [
    # the exact tag first
    (["de", "de-AT"], "de-AT", "en", Choice("de-AT", "de-AT")),
    # then its language
    (["de", "ru"], "de-AT", "en", Choice("de", "de")),
    (["de", "ru"], "de-CH", "en", Choice("de", "de")),
    # then the default version, in MAILER_DEFAULT_LOCALE's language
    (["de", "ru"], "fr", "en", Choice(None, "en")),
    (["de", "ru"], "fr-CA", "fr", Choice(None, "fr")),
    (["de", "ru"], None, "en", Choice(None, "en")),
    ([], "de", "en", Choice(None, "en")),
    # a region never falls back to a sibling region, only to the bare language
    (["de-CH"], "de-AT", "en", Choice(None, "en")),
    (["de-CH"], "de", "en", Choice(None, "en")),
    # comparisons ignore case, and the key comes back as it was given
    (["DE_at"], "de-at", "en", Choice("DE_at", "de-AT")),
    # a malformed request is no request
    (["de"], "??", "en", Choice(None, "en")),
    # a malformed default still names a language
    (["de"], "fr", "", Choice(None, "en")),
])
def test_choose_exact_then_language_then_default(
    available: list[str], wanted: str | None, default: str, expected: Choice
) -> None:
    assert choose(available, wanted, default) == expected


def test_pick_returns_the_translation_and_its_language() -> None:
    versions = {"de": "Hallo", "ru": "Привет"}
    assert pick(versions, "de-AT") == ("Hallo", "de")
    assert pick(versions, "ru", "en") == ("Привет", "ru")
    assert pick(versions, "fr", "en") == (None, "en")


def test_translated_topic_fields_fall_back_to_the_default_text() -> None:
    translations = {"de": {"title": "Neuigkeiten", "description": ""}, "ru": {"title": ""}}
    assert translated("News", translations, "title", "de") == "Neuigkeiten"
    assert translated("News", translations, "title", "de-AT") == "Neuigkeiten"
    # an empty or missing field, an unknown language, or no translations: the default
    assert translated("About", translations, "description", "de") == "About"
    assert translated("News", translations, "title", "ru") == "News"
    assert translated("News", translations, "title", "fr") == "News"
    assert translated("News", None, "title", "de") == "News"


def test_the_default_locale_is_configured_and_checked_at_start_up() -> None:
    from mailer.config import Settings, check
    from mailer.errors import ConfigError

    base = {"MAILER_ENV": "test"}
    assert Settings.from_environ(base).default_locale == "en"
    german = Settings.from_environ({**base, "MAILER_DEFAULT_LOCALE": "de-AT"})
    assert german.default_locale == "de-AT"
    check(german)
    with pytest.raises(ConfigError, match="MAILER_DEFAULT_LOCALE"):
        check(Settings.from_environ({**base, "MAILER_DEFAULT_LOCALE": "German"}))
