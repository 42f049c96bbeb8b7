"""html_to_text's three readers agree: the cached-tag reader, the regex reader, HTMLParser.

Each faster reader may decline a document (and hand it to the next), but whenever it
answers, its text must be exactly HTMLParser's. Documents are generated from fragments
that real mail HTML is made of, plus the awkward cases each reader has to notice. The
text part's line wrapping has a fast path too; it must wrap as the word loop does.
"""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.mail import text_readers
from mailer.mail.mime import _wrap_plain, _wrap_words, wrap_text
from mailer.mail.text import _fast_feed, _quick_text, _TextExtractor, html_to_text

FRAGMENTS = [
    # structure
    "<p>", "</p>", "<P class=x>", "<div>", "</div>", "<br>", "<br/>", "<BR />", "<hr>",
    "<h1>", "</h1>", "<table>", "</table>", "<tr>", "</tr>", "<td>", "</td>", "<th>",
    "</th>", "<td align=\"right\">", "<ul>", "</ul>", "<ol>", "</ol>", "<li>", "</li>",
    "<pre>", "</pre>", "<blockquote>", "</blockquote>", "<span>", "</span>", "<b>", "</b>",
    "<center>", "</center>", "<p/>", "<div/>", "<li/>", "<ul/>", "</br>", "</img>",
    # hidden parts
    "<head>", "</head>", "<title>", "</title>", "<body>", "</body>", "<html lang=en>",
    "</html>", "<template>", "</template>",
    "<style>p{margin:0}</style>", "<STYLE type='text/css'>a<b</style >",
    "<script>if (a < b && c > d) {}</script>", "<script>never closed", "<style/>",
    # links and images
    '<a href="https://example.com/x?a=1&amp;b=2">', "<a href='https://e.com'>", "<a>",
    '<a href="#top">', '<a href="javascript:void(0)">', "<a href=https://bare.example>",
    '<a href=" https://spaced.example ">', "</a>", "</A>",
    '<img src="x.png" alt="Shop now">', '<img alt="">', "<img alt='a  b\tc'/>",
    '<img src=x alt="R&amp;D">', '<a title="x>y" href="https://q.example">',
    # comments, doctypes, processing instructions
    "<!-- note -->", "<!---->", "<!-- a > b -->", "<!--[if mso]><table><![endif]-->",
    "<!doctype html>", "<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0//EN\">", "<?xml x?>",
    # odd markup every reader must notice
    "<", ">", "< p>", "</>", "<3", "a<b", "<p<p>", "<a href=\"unclosed>", "<!-->", "<x-y z>",
    "<p\n class=\"a\"\n>", "<td\tnowrap>", "</ p>", "</p \n>", "<img alt=a/>",
    # text and entities
    "Hello", " world ", "  ", "\n", "\r\n", "\t", "&amp;", "&mdash;", "&nbsp;", "&#233;",
    "&#x e9;", "&lt;p&gt;", "&bogus;", "Grüße", "x\u00a0y", "https://example.com/x",
    "line one\nline two", "\u2003em space\u2003",
]


def by_htmlparser(html: str) -> str:
    """The reference: the handlers fed by HTMLParser itself."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return "".join(parser.out).strip()


def by_regex(html: str) -> str | None:
    """The regex reader's text, or None when it declines the document."""
    parser = _TextExtractor()
    return "".join(parser.out).strip() if _fast_feed(parser, html) else None


def check_agreement(html: str) -> tuple[bool, bool]:
    """Assert every reader that answers gives HTMLParser's text; say which ones answered."""
    expected = by_htmlparser(html)
    quick, regex = _quick_text(html), by_regex(html)
    if quick is not None:
        assert quick == expected, html
    if regex is not None:
        assert regex == expected, html
    assert html_to_text(html) == expected, html
    return quick is not None, regex is not None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=40))
def test_every_reader_that_answers_agrees_with_htmlparser(parts: list[str]) -> None:
    check_agreement("".join(parts))


def test_a_large_seeded_sample_agrees_and_mostly_takes_the_quick_reader() -> None:
    # Given 4,000 documents of 1-60 fragments each (fixed seed: the same every run)
    rng = random.Random(2920)
    answered = 0
    total = 4000
    for _ in range(total):
        html = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 60)))
        # Then every reader that answers agrees with HTMLParser
        quick, _ = check_agreement(html)
        answered += quick
    # And the quick reader answered for a real share of them (the test exercises it)
    assert answered > total // 10


def test_well_formed_mail_html_takes_the_quick_reader() -> None:
    # Given the kind of HTML a template renders: head, style, tables, lists, links
    html = (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>T</title>"
        "<style>p{margin:0}</style></head><body><div><h1>Title</h1>"
        "<p>Hello <b>Jane</b>,&nbsp;welcome &mdash; see "
        "<a href=\"https://example.com/a?x=1&amp;y=2\">your account</a>.</p>"
        "<table><tr><th>Date</th><th>Amount</th></tr><tr><td>1 May</td><td>3 EUR</td></tr>"
        "</table><ul><li>One</li><li>Two<ul><li>Nested</li></ul></li></ul>"
        "<pre>  keep\n    this</pre><img src=\"x.png\" alt=\"Logo\"></div></body></html>"
    )
    # Then the quick reader answers, with HTMLParser's text
    assert _quick_text(html) == by_htmlparser(html)
    assert html_to_text(html) == (
        "Title\n\nHello Jane, welcome — see your account (https://example.com/a?x=1&y=2)."
        "\n\nDate Amount\n1 May 3 EUR\n\n- One\n- Two\n  - Nested\n\n  keep\n    this\n\nLogo"
    )


@pytest.mark.parametrize(
    "html",
    [
        "<p>a < b</p>",                              # a "<" that opens no tag
        '<a title="x>y" href="https://e.com">z</a>',  # ">" inside a quoted value
        "<!-- a > b --><p>x</p>",                    # ">" inside a comment
        "<style>p{}",                                # a style that never ends
    ],
)
def test_the_quick_reader_declines_what_it_cannot_read_exactly(html: str) -> None:
    # Given markup whose meaning depends on more than the text up to the first ">"
    # Then the quick reader declines, and html_to_text still gives HTMLParser's text
    assert _quick_text(html) is None
    assert html_to_text(html) == by_htmlparser(html)


def test_the_tag_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a small bound on the cache of distinct tags
    monkeypatch.setattr(text_readers, "_TAGS", {})
    monkeypatch.setattr(text_readers, "_MAX_TAGS", 50)
    # When documents with 500 distinct tags are read
    html = "".join(f'<a href="https://e.com/{n}">{n}</a>' for n in range(500))
    assert _quick_text(html) == by_htmlparser(html)
    # Then the cache never held more than the bound
    assert len(text_readers._TAGS) <= 50


# --- wrapping the text part --------------------------------------------------------------

_WORDS = st.lists(st.text(alphabet="abcdefghij-./:é", min_size=1, max_size=30), min_size=1,
                  max_size=40)


@settings(max_examples=500, deadline=None)
@given(_WORDS, st.integers(min_value=1, max_value=100))
def test_the_fast_wrap_wraps_plain_lines_as_the_word_loop_does(
    words: list[str], width: int,
) -> None:
    # Given a line of words split by single spaces (the fast path's case)
    line = " ".join(words)
    fast: list[str] = []
    slow: list[str] = []
    # When both wrap it
    _wrap_plain(line, width, fast)
    _wrap_words(line, width, slow)
    # Then they agree line for line
    assert fast == slow


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["word", "x" * 90, " ", "  ", "\t", "\xa0", "\n", "\r\n",
                                 "\r", "-- ", "é"]), max_size=60).map("".join))
def test_wrap_text_wraps_any_text_as_the_word_loop_does(text: str) -> None:
    expected: list[str] = []
    for line in re.split(r"\r\n|\r|\n", text):
        if len(line) <= 78 or " " not in line.strip(" "):
            expected.append(line)
        else:
            _wrap_words(line, 78, expected)
    assert wrap_text(text) == expected
