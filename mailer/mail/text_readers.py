"""The two fast readers behind :func:`~mailer.mail.text.html_to_text`.

:func:`_fast_feed` tokenizes with one regex and feeds :class:`_TextExtractor`'s handlers;
:func:`_quick_text` inlines those handlers over a split at ``<`` with a cache of what each
distinct tag means. Both stop (False / None) at anything :class:`html.parser.HTMLParser`
might read differently, so the caller falls back to the next reader.
"""

from __future__ import annotations

import re
from html import unescape

from mailer.mail.text_extractor import _HIDDEN, _LINE, _NO_TARGET, _PARAGRAPH, _TextExtractor

# HTML's ASCII white space; other Unicode spaces send a document to HTMLParser.
_WS = r"[\t\n\r\f ]"
# Attributes separated by white space, with optional quoted or bare values. Possessive
# quantifiers stop backtracking from splitting a bare value such as "x/" into "x" + "/>".
_ATTRS = (
    rf"(?:{_WS}++[a-zA-Z_:][-a-zA-Z0-9_:.]*+"
    rf"""(?:{_WS}*+={_WS}*+(?:"[^"]*+"|'[^']*+'|[^\s"'=<>`]++))?+)*+"""
)
# One token, in the forms HTMLParser reads the same way: a run of text; a <script> or
# <style> element whose content runs unparsed to its end tag; any other start tag; an end
# tag; a comment (closed like _markupbase's "--\s*>"); a doctype; a processing
# instruction. Any other "<" is the last alternative, which makes the caller fall back.
_TOKEN = re.compile(
    rf"""([^<]++)
    | <(?:
        ((?i:script|style))(?![a-zA-Z0-9-])({_ATTRS}){_WS}*+>(.*?)</\s*(?i:\2)\s*>
      | (?!(?i:script|style)(?![a-zA-Z0-9-]))([a-zA-Z][a-zA-Z0-9-]*+)({_ATTRS}){_WS}*+(/?)>
      | /\s*+([a-zA-Z][-.a-zA-Z0-9:_]*+)\s*+>
      | !--.*?--\s*>
      | ![dD][oO][cC][tT][yY][pP][eE][^>]*+>
      | \?[^>]*+>
    )
    | (<)""",
    re.VERBOSE | re.DOTALL,
)
_ATTRIBUTE = re.compile(
    r"""([a-zA-Z_:][-a-zA-Z0-9_:.]*+)"""
    rf"""(?:{_WS}*+={_WS}*+("[^"]*+"|'[^']*+'|[^\s"'=<>`]++))?"""
)
# Tags whose start and end handlers do something; the rest (b, span, html...) are skipped.
_ACTIVE = _HIDDEN | _LINE | _PARAGRAPH | {"a", "body", "br", "img", "td", "th"}


def _attributes(text: str) -> list[tuple[str, str | None]]:
    """Attributes as HTMLParser reports them: lower-case names, unquoted, unescaped."""
    found: list[tuple[str, str | None]] = []
    for match in _ATTRIBUTE.finditer(text):
        name, value = match.group(1), match.group(2)
        if value is not None:
            if value[:1] in ("'", '"'):
                value = value[1:-1]
            if value:
                value = unescape(value)
        found.append((name.lower(), value))
    return found


def _fast_feed(parser: _TextExtractor, html: str) -> bool:
    """Feed ``html`` to the handlers; False (stop) at anything HTMLParser might read apart."""
    data, starttag, endtag = parser.handle_data, parser.handle_starttag, parser.handle_endtag
    # findall tokenizes in C; the alternatives cover every position, so nothing is skipped.
    for text, raw, _, raw_body, tag, attrs, empty, end, stray in _TOKEN.findall(html):
        if text:
            if text.isspace() and not parser._pre:
                # What handle_data does with white space alone, without the call.
                if not parser._hidden:
                    parser._space = True
            else:
                data(unescape(text) if "&" in text else text)
        elif tag:
            tag = tag.lower()
            if tag in _ACTIVE:
                # Only links and images read their attributes (href, alt).
                starttag(tag, _attributes(attrs) if attrs and tag in ("a", "img") else [])
                if empty:
                    endtag(tag)  # HTMLParser's handle_startendtag does both
        elif end:
            end = end.lower()
            if end in _ACTIVE:
                endtag(end)
        elif raw:
            raw = raw.lower()
            starttag(raw, [])
            if raw_body:
                data(raw_body)
            endtag(raw)
        elif stray:
            return False
        # Otherwise a comment, doctype or processing instruction: nothing to show.
    return True


# What a tag (the text between "<" and the first ">") does, worked out once per distinct
# tag by _classify and cached: its kind, then for start and end tags the parts of
# handle_starttag / handle_endtag that apply, as small codes the hot loop tests cheaply.
_SKIP, _START, _END, _RAW = range(4)
# Hiding: a _HIDDEN element, or <body> (which ends an unclosed <head> or <title>).
_HIDES, _BODY = 1, 2
# Line breaks: _LINE, _PARAGRAPH, or a list (one line inside a list, else a paragraph).
_BREAK_LINE, _BREAK_PARAGRAPH, _BREAK_LIST = 1, 2, 3
# The element's own action.
_BR, _LI, _LIST, _PRE, _CELL, _LINK, _IMAGE = range(1, 8)
_ACTIONS = {"br": _BR, "li": _LI, "ol": _LIST, "ul": _LIST, "pre": _PRE, "td": _CELL,
            "th": _CELL, "a": _LINK, "img": _IMAGE}
#: (kind, name, self-closing, href or alt, hiding, line break, action)
_Tag = tuple[int, str, bool, str, int, int, int]
# A <script> or <style> start tag; its content runs to the first matching end tag.
_RAW_START = re.compile(rf"((?i:script|style))(?![a-zA-Z0-9-]){_ATTRS}{_WS}*+")
# The end of that content, as _TOKEN's "</\s*(?i:\2)\s*>" finds it (without the "<>").
_RAW_END = {name: re.compile(rf"/\s*(?i:{name})\s*") for name in ("script", "style")}
# Distinct tags seen, with their meaning (None: send the document to _fast_feed). A
# template's tags repeat in every message; the bound keeps odd input from growing it.
_TAGS: dict[str, _Tag | None] = {}
_MAX_TAGS = 4096


def _element(kind: int, name: str, empty: bool = False, value: str = "") -> _Tag:
    hiding = _HIDES if name in _HIDDEN else _BODY if name == "body" and kind == _START else 0
    brk = (_BREAK_LIST if name in ("ol", "ul") else _BREAK_PARAGRAPH if name in _PARAGRAPH
           else _BREAK_LINE if name in _LINE else 0)
    return (kind, name, empty, value, hiding, brk, _ACTIONS.get(name, 0))


def _classify(inner: str) -> _Tag | None:
    """What ``<inner>`` means, exactly as :data:`_TOKEN` tokenizes it; None if unsure."""
    raw = _RAW_START.fullmatch(inner)
    if raw is not None:
        return _element(_RAW, raw.group(1).lower())
    match = _TOKEN.fullmatch(f"<{inner}>")
    if match is None or match.group(9) is not None:
        return None
    tag, attrs, empty, end = match.group(5, 6, 7, 8)
    if tag:
        tag = tag.lower()
        if tag not in _ACTIVE:
            return _element(_SKIP, tag)
        # Only links and images read an attribute: what handle_starttag makes of it.
        value = ""
        if attrs and tag == "a":
            value = (dict(_attributes(attrs)).get("href") or "").strip()
        elif attrs and tag == "img":
            value = " ".join((dict(_attributes(attrs)).get("alt") or "").split())
        return _element(_START, tag, bool(empty), value)
    if end:
        end = end.lower()
        return _element(_END if end in _ACTIVE else _SKIP, end)
    return _element(_SKIP, "")  # a comment, doctype or processing instruction


def _quick_text(html: str) -> str | None:
    """:class:`_TextExtractor` over :func:`_fast_feed`'s tokens, inlined; None to fall back.

    The state and every branch mirror :class:`_TextExtractor`'s handlers one for one
    (``_break``, ``_emit``, ``handle_starttag``, ``handle_endtag``, ``_end_link``,
    ``handle_data``); the method calls and set lookups per token were most of the cost.
    """
    pieces = html.split("<")
    out: list[str] = []
    hidden: dict[str, int] = {}
    pre = lists = pending = 0
    space, spaced = False, True
    links: list[tuple[str, int]] = []
    raw_end: re.Pattern[str] | None = None
    tags = _TAGS
    text = pieces[0]
    index = 0
    count = len(pieces)
    while True:
        if text:
            # _fast_feed's text token, then handle_data.
            if not pre and text.isspace():
                if not hidden:
                    space = True
            elif not hidden:
                data = unescape(text) if "&" in text else text
                if pre:
                    data = data.replace("\r\n", "\n").replace("\r", "\n")
                    if data:
                        if pending:
                            out.append("\n" * min(pending, 2))
                            pending = 0
                        space = False
                        out.append(data)
                        spaced = data[-1].isspace()
                else:
                    words = data.split()
                    if not words:
                        space = True
                    else:
                        if pending:
                            out.append("\n" * min(pending, 2))
                            pending = 0
                        elif (space or data[0].isspace()) and not spaced:
                            out.append(" ")
                        out.append(" ".join(words))
                        spaced = False
                        space = data[-1].isspace()
        index += 1
        if index >= count:
            break
        inner, closed, text = pieces[index].partition(">")
        if raw_end is not None:
            # Inside <script> or <style>: hidden content, up to its first end tag.
            if closed and raw_end.fullmatch(inner):
                raw_end = None
            else:
                text = ""
            continue
        if not closed:
            return None  # a "<" that opens no tag: HTMLParser may read it as text
        try:
            tag = tags[inner]
        except KeyError:
            tag = _classify(inner)
            if len(tags) >= _MAX_TAGS:
                tags.clear()
            tags[inner] = tag
        if tag is None:
            return None
        kind, name, empty, value, hiding, brk, action = tag
        if kind == _SKIP:
            continue
        if kind == _RAW:
            # handle_starttag + handle_data + handle_endtag of a hidden element: no change.
            raw_end = _RAW_END[name]
            text = ""
            continue
        if kind == _START:
            # handle_starttag
            if hiding == _HIDES:
                hidden[name] = hidden.get(name, 0) + 1
            elif hiding == _BODY:
                hidden.pop("head", None)
                hidden.pop("title", None)
            if brk:
                if out:
                    wanted = 1 if brk == _BREAK_LINE or (brk == _BREAK_LIST and lists) else 2
                    if wanted > pending:
                        pending = wanted
                space = False
            if action == _BR:
                if out:
                    pending += 1
                space = False
            elif action == _LI:
                if pending:
                    out.append("\n" * min(pending, 2))
                    pending = 0
                space = False
                out.append("  " * (lists - 1) + "- " if lists > 1 else "- ")
                spaced = True
            elif action == _LIST:
                lists += 1
            elif action == _PRE:
                pre += 1
            elif action == _CELL:
                space = True
            elif action == _LINK:
                links.append((value, len(out)))
            elif action == _IMAGE and value and not hidden:
                if pending:
                    out.append("\n" * min(pending, 2))
                    pending = 0
                elif space and not spaced:
                    out.append(" ")
                space = False
                out.append(value)
                spaced = False  # split and joined: it ends in a word
            if not empty:
                continue
            # HTMLParser's handle_startendtag: the end tag follows at once.
        # handle_endtag
        if hiding == _HIDES:
            if hidden.get(name, 0) > 1:
                hidden[name] -= 1
            else:
                hidden.pop(name, None)
        if action == _LIST:
            if lists:
                lists -= 1
        elif action == _PRE:
            if pre:
                pre -= 1
        elif action == _CELL:
            space = True
        elif action == _LINK and links:
            # _end_link
            href, start = links.pop()
            if href and not href.startswith(_NO_TARGET):
                shown = "".join(out[start:]).strip()
                if not shown or shown != href:
                    label = f"({href})" if shown else href
                    if pending:
                        out.append("\n" * min(pending, 2))
                        pending = 0
                    elif (space or shown) and not spaced:
                        out.append(" ")
                    out.append(label)
                    spaced = False  # ")" or the stripped href's last character
                    if not shown:
                        space = False
        if brk:
            if out:
                wanted = 1 if brk == _BREAK_LINE or (brk == _BREAK_LIST and lists) else 2
                if wanted > pending:
                    pending = wanted
            space = False
    if raw_end is not None:
        return None  # a <script> or <style> that never ends
    return "".join(out).strip()
