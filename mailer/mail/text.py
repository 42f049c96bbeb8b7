"""Plain-text alternative derived from an HTML body, with only the stdlib HTML parser.

Three readers give the same text; the first that accepts the document runs:

1. :func:`_quick_text` splits at ``<`` (in C), looks each distinct tag up in a cache of
   what it means (a template's tags repeat in every message) and runs the handlers' logic
   inline: about 30 us for the benchmark's 2 KB message.
2. :func:`_fast_feed`, a regex tokenizer feeding :class:`_TextExtractor`'s handlers; it
   also reads comments holding ``>`` and quoted attribute values holding ``>``.
3. :class:`html.parser.HTMLParser` itself (pure-Python scanning and line counting, about
   290 us per 3 KB message) for anything else.

Each faster reader stops at anything it does not read exactly as the next one does, so
the output never depends on which one ran (tests/mail/test_text.py compares them).
Readers 1 and 2 live in :mod:`mailer.mail.text_readers`; the handlers that 2 and 3 drive,
which define the text, in :mod:`mailer.mail.text_extractor`.
"""

from __future__ import annotations

from mailer.mail.text_extractor import _TextExtractor
from mailer.mail.text_readers import _fast_feed, _quick_text


def html_to_text(html: str) -> str:
    """Return a readable plain-text rendering of ``html`` for the text/plain part."""
    quick = _quick_text(html)
    if quick is not None:
        return quick
    parser = _TextExtractor()
    if not _fast_feed(parser, html):
        parser = _TextExtractor()
        parser.feed(html)
        parser.close()
    return "".join(parser.out).strip()
