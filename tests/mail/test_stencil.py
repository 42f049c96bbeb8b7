"""Render once, fill per recipient: a filled stencil is byte for byte what a full render is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailer.mail.stencil import StencilCache, fillable, marker, plain_outputs
from mailer.mail.stored import StoredTemplate
from mailer.mail.templates import Catalogue, Footer, Rendered, Template
from suppression.policy import Category
from tests.conftest import ROOT

CATALOGUE = Catalogue(ROOT / "templates")
ENV = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.i18n"])
ENV.install_null_translations(newstyle=True)  # type: ignore[attr-defined]

#: Names, headlines and URLs as people and callers write them, plus the awkward ones:
#: markup, entities, white space runs, control and private-use characters, the empty string.
values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["Ada", "José Ñúñez", "李小龙", "O'Brien & Sons", "<b>bold</b>",
                     "&amp;", "  padded ", "two  spaces", "line\nbreak", "", "\ue0001\ue001",
                     "tab\there", "\xa0nbsp", "x" * 300]),
    st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=3),
)


def sample_data(template: Template, personal: dict[str, Any]) -> dict[str, Any]:
    """What every shipped template needs, with the personal fields laid over it."""
    base: dict[str, Any] = {
        "name": "Ada", "title": "Your statement", "body": "Nothing changed.",
        "headline": "News", "confirm_url": "https://example.test/c/abc",
        "topic_title": "the newsletter", "version": "2", "effective_at": "2026-12-01",
        "summary_url": "https://example.test/s", "preferences_url": "https://example.test/p/x",
    }
    return {**base, **personal}


def both_ways(template: Template, data: dict[str, Any], cache: StencilCache,
              language: str | None = None) -> tuple[Rendered | str, Rendered | str]:
    """A full render and a reused one of ``data`` (everything in it shared), or the error
    each raised as text: reuse must raise what render raises."""
    results: list[Rendered | str] = []
    for reuse in (False, True):
        try:
            results.append(template.render_reused(data, cache, language=language,
                                                  common=data.keys()) if reuse
                           else template.render(data, language=language))
        except Exception as exc:
            results.append(f"{type(exc).__name__}: {exc}")
    return results[0], results[1]


def shipped_versions() -> list[tuple[Template, str]]:
    return [(version, language) for template in CATALOGUE
            for language, version in [("en", template), *template.translations.items()]]


@pytest.mark.parametrize(("template", "language"), shipped_versions(),
                         ids=lambda v: getattr(v, "name", v))
@settings(max_examples=60, deadline=None)
@given(name=values, body=values, url=values)
def test_every_shipped_version_fills_to_what_it_renders(
    template: Template, language: str, name: Any, body: Any, url: Any,
) -> None:
    # Given a shipped version and personal values of any shape (one cache for all, as a
    # worker keeps one)
    data = sample_data(template, {"name": name, "body": body, "confirm_url": url})
    # When it is rendered in full and reused from a stencil
    expected, got = both_ways(template, data, SHARED, language)
    # Then both agree, byte for byte (or fail alike)
    assert got == expected


SHARED = StencilCache(size=64)


def test_a_campaign_renders_once_and_fills_the_rest() -> None:
    # Given the newsletter for 200 people who differ only by name, with shared campaign data
    template = CATALOGUE.get("newsletter")
    cache = StencilCache()
    shared = {"headline": "Autumn sale", "body": "Everything <b>half</b> price & more."}
    # When each message is rendered through the cache
    results = [template.render_reused({**shared, "name": f"Reader {n}"}, cache, language="en",
                                      common=shared.keys()) for n in range(200)]
    # Then jinja ran once; every other message was filled in
    assert (cache.misses, cache.hits) == (1, 199)
    # And each message is exactly what a full render gives, with its own name, escaped
    for n in (0, 57, 199):
        assert results[n] == template.render({**shared, "name": f"Reader {n}"}, language="en")
        assert f"Hello Reader {n}," in results[n].html
    assert "Everything &lt;b&gt;half&lt;/b&gt; price &amp; more." in results[0].html
    assert "Everything <b>half</b> price & more." in results[0].text


def test_a_value_that_cannot_be_filled_is_part_of_the_key() -> None:
    # Given names a derived text part would fold (white space runs) or that hold a marker
    template = CATALOGUE.get("newsletter")
    cache = StencilCache()
    shared = {"headline": "News", "body": "Body"}
    for name in ("Ada  Lovelace", f"Ada {marker(0)}", "", " Ada"):
        # When they are rendered through the cache
        got = template.render_reused({**shared, "name": name}, cache, common={"name", *shared})
        # Then the result is the full render's
        assert got == template.render({**shared, "name": name})
    assert not fillable("Ada  Lovelace") and fillable("Ada Lovelace")


def test_a_single_send_reuses_only_what_every_message_of_its_template_shares() -> None:
    # Given single sends of an account notice (its own data per message: a list of items)
    template = Template("notice", Category.SERVICE_ALERT, None, "Hi {{ name }}",
                        "<p>Hi {{ name }}</p><ul>{% for i in items %}<li>{{ i }}</li>"
                        "{% endfor %}</ul>")
    cache = StencilCache()
    for n in range(20):
        data = {"name": f"Ada {n}", "items": [str(n), "fee"]}
        # When each is rendered with nothing in common with other messages
        got = template.render_reused(data, cache)
        # Then it is the full render, and no stencil is made for one message only
        assert got == template.render(data)
    assert (cache.misses, cache.hits) == (0, 0)
    # But a template whose every value can be filled is rendered once for all its sends
    reset = Template("reset", Category.SERVICE_ALERT, None, "Reset for {{ name }}",
                     '<p>Hi {{ name }}, <a href="{{ url }}">reset</a>.</p>')
    for n in range(20):
        data = {"name": f"Ada {n}", "url": f"https://example.test/r/{n}?a=1&b=2"}
        assert reset.render_reused(data, cache) == reset.render(data)
    assert (cache.misses, cache.hits) == (1, 19)


@pytest.mark.parametrize("source", [
    "{{ name|upper }}", "{% if name %}x{% endif %}{{ name }}", "{{ name ~ '!' }}",
    "{% for c in name %}{{ c }}{% endfor %}", "{% set name = 'x' %}{{ name }}",
    "{{ name.title() }}", "{% macro m(name) %}{{ name }}{% endmacro %}{{ name }}",
    "{{ name }}{{ name|length }}", "{% include 'other.html' %}",
])
def test_a_variable_used_other_than_bare_is_never_filled(source: str) -> None:
    # Given a source that transforms, tests, loops over, assigns or includes a variable
    plain = plain_outputs(ENV, source)
    # Then it is not filled (or the template is never reused at all)
    assert plain is None or "name" not in plain


def test_bare_outputs_and_trans_variables_are_filled() -> None:
    # Given bare outputs (also in loops over other data) and a trans block's variable
    source = ("{{ name }}{% for i in items %}{{ name }}{{ i }}{% endfor %}"
              "{% trans %}Hi {{ who }}{% endtrans %}")
    # Then they may be filled, but a loop variable may not
    assert plain_outputs(ENV, source) == frozenset({"name", "who"})


@pytest.mark.parametrize("source", [
    "{{ name|e }}, {{ name }}", "{% if name == 'Ada' %}Hi Ada{% else %}{{ name }}{% endif %}",
    "{{ name[0] }} {{ name }}", "{{ name }}<p>{{ name|length }}</p>",
])
@settings(max_examples=40, deadline=None)
@given(name=values)
def test_templates_that_read_the_value_still_render_as_in_full(source: str, name: Any) -> None:
    # Given a template whose output depends on the value itself
    template = Template("t", Category.SERVICE_ALERT, None, "{{ name }}", source)
    # When it is rendered in full and reused from a stencil
    expected, got = both_ways(template, {"name": name}, StencilCache())
    # Then reuse gives what a full render gives
    assert got == expected


@settings(max_examples=80, deadline=None)
@given(first=values, second=values)
def test_a_stored_template_fills_within_its_sandbox(first: Any, second: Any) -> None:
    # Given a stored marketing template with a Russian version
    template = StoredTemplate(
        "promo", "newsletter", "{{ headline }} for {{ name }}",
        "<p>Hi {{ name }}</p><h1>{{ headline }}</h1>{% if vip %}<b>VIP</b>{% endif %}", None,
        translations={"ru": {"subject": "{{ headline }}: {{ name }}",
                             "html": "<p>Привет, {{ name }}</p><p>{{ headline }}</p>"}})
    cache = StencilCache()
    for language, version in (("en", template), ("ru", template.translations["ru"])):
        for name, vip in ((first, True), (second, False), ("Ada", True)):
            data = {"headline": "Sale", "name": name, "vip": vip}
            # When rendered both ways
            expected, got = both_ways(version, data, cache, language)
            # Then they agree
            assert got == expected


def footer_languages() -> list[str]:
    return ["en", *sorted({language for _, language in shipped_versions()} - {"en"})]


@pytest.mark.parametrize("language", footer_languages())
@settings(max_examples=60, deadline=None)
@given(title=values.filter(lambda v: isinstance(v, str)),
       token=st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-_.", min_size=1,
                     max_size=60))
def test_the_footer_fills_to_what_it_renders(language: str, title: str, token: str) -> None:
    # Given the promotion footer in a language, with per-recipient links
    footer: Footer = CATALOGUE.footer
    body = Rendered("Subject", "<html><body><p>Hi</p></body></html>", "Hi")
    values = {"topic_title": title, "unsubscribe_url": f"https://example.test/u/{token}",
              "preferences_url": f"https://example.test/preferences/{token}?a=1&b=2",
              "postal_address": "Example Ltd, 1 Example Street, 00000 Example City"}
    # When it is applied in full and from its stencil
    # Then both agree byte for byte
    assert footer.apply(body, values, language, reuse=True) == footer.apply(body, values,
                                                                            language)


def test_the_footer_renders_once_per_language_and_campaign(tmp_path: Path) -> None:
    # Given a fresh footer and 100 recipients of one campaign
    footer = Footer(ROOT / "templates" / "_system", CATALOGUE.messages)
    body = Rendered("S", "<body>x</body>", "x")
    for n in range(100):
        footer.apply(body, {"topic_title": "the newsletter",
                            "unsubscribe_url": f"https://example.test/u/{n}",
                            "preferences_url": f"https://example.test/p/{n}",
                            "postal_address": "Example Ltd, 1 Example Street"}, "en", reuse=True)
    # Then the footer was rendered once and filled 99 times
    assert (footer.stencils.misses, footer.stencils.hits) == (1, 99)


def test_the_cache_is_bounded_by_the_text_it_holds() -> None:
    # Given a cache that may hold 10,000 characters, and campaigns whose bodies are 3,000
    # (with line breaks, so they are fixed in the stencil rather than filled in)
    cache = StencilCache(size=100, chars=10_000)
    template = CATALOGUE.get("newsletter")
    for n in range(10):
        shared = {"headline": f"Issue {n}", "body": f"{n}\n" + "x" * 3000}
        data = {**shared, "name": "Ada"}
        # When each campaign's stencil is made
        assert template.render_reused(data, cache, common=shared.keys()) == template.render(data)
        # Then the oldest are dropped to stay within the bound
        assert cache.held_chars <= 10_000
    assert cache.misses == 10
    # And the newest is still there: filling it is a hit
    template.render_reused({"headline": "Issue 9", "body": "9\n" + "x" * 3000, "name": "Bo"},
                           cache, common={"headline", "body"})
    assert cache.hits == 1
