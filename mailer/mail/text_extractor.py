"""The reference reading of HTML as text: :class:`html.parser.HTMLParser` handlers.

:class:`_TextExtractor` decides what the plain-text alternative says; the faster readers
in :mod:`mailer.mail.text_readers` reproduce its output exactly (see :mod:`mailer.mail.text`).
"""

from __future__ import annotations

from html.parser import HTMLParser

# Content a mail client never shows as text. <noscript> is not here: mail clients run no
# scripts, so its content is what readers actually see.
_HIDDEN = frozenset({"head", "script", "style", "template", "title"})
# Elements that start a new line, and those that are set apart by a blank line.
_LINE = frozenset({
    "address", "article", "aside", "caption", "center", "dd", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "header", "li", "main", "nav", "section", "tr",
})
_PARAGRAPH = frozenset({
    "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "ol", "p", "pre", "table", "ul",
})
# Link targets that mean nothing outside the HTML document.
_NO_TARGET = ("#", "javascript:", "data:")


class _TextExtractor(HTMLParser):
    """Collects visible text, turning block structure into line breaks as it goes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive already unescaped
        self.out: list[str] = []
        self._hidden: dict[str, int] = {}
        self._pre = 0
        self._lists = 0
        self._pending = 0  # line breaks owed before the next text
        self._space = False  # a collapsed space owed before the next text on this line
        self._spaced = True  # the output so far ends in white space (or is empty)
        self._links: list[tuple[str, int]] = []

    def _break(self, count: int) -> None:
        if self.out:
            self._pending = max(self._pending, count)
        self._space = False

    def _emit(self, text: str, *, verbatim: bool = False) -> None:
        if not text:
            return
        if self._pending:
            self.out.append("\n" * min(self._pending, 2))
            self._pending = 0
        elif self._space and not self._spaced and not verbatim:
            self.out.append(" ")
        self._space = False
        self.out.append(text)
        self._spaced = text[-1].isspace()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open an element: hide it, break the line, or start a list item or link."""
        if tag in _HIDDEN:
            self._hidden[tag] = self._hidden.get(tag, 0) + 1
        elif tag == "body":
            # A <head> or <title> that was never closed ends where the body starts.
            self._hidden.pop("head", None)
            self._hidden.pop("title", None)
        if tag in _PARAGRAPH:
            # A list nested in a list item only starts a new line.
            self._break(1 if self._lists and tag in ("ol", "ul") else 2)
        elif tag in _LINE:
            self._break(1)
        if tag == "br":
            if self.out:
                self._pending += 1
            self._space = False
        elif tag == "li":
            self._emit("  " * max(self._lists - 1, 0) + "- ", verbatim=True)
        elif tag in ("ol", "ul"):
            self._lists += 1
        elif tag == "pre":
            self._pre += 1
        elif tag in ("td", "th"):
            self._space = True
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            self._links.append((href.strip(), len(self.out)))
        elif tag == "img" and not self._hidden:
            alt = " ".join((dict(attrs).get("alt") or "").split())
            self._emit(alt)

    def handle_endtag(self, tag: str) -> None:
        """Close an element: end hiding, break the line, or finish a link."""
        if tag in _HIDDEN:
            if self._hidden.get(tag, 0) > 1:
                self._hidden[tag] -= 1
            else:
                self._hidden.pop(tag, None)
        if tag in ("ol", "ul") and self._lists:
            self._lists -= 1
        elif tag == "pre" and self._pre:
            self._pre -= 1
        elif tag in ("td", "th"):
            self._space = True
        elif tag == "a" and self._links:
            self._end_link(*self._links.pop())
        if tag in _PARAGRAPH:
            self._break(1 if self._lists and tag in ("ol", "ul") else 2)
        elif tag in _LINE:
            self._break(1)

    def _end_link(self, href: str, start: int) -> None:
        if not href or href.startswith(_NO_TARGET):
            return
        text = "".join(self.out[start:]).strip()
        if not text:
            self._emit(href)
        elif text != href:
            trailing = self._space  # white space inside the link's end still separates
            self._space = True
            self._emit(f"({href})")
            self._space = trailing

    def handle_data(self, data: str) -> None:
        """Add text, collapsing white space except inside ``<pre>``."""
        if self._hidden:
            return
        if self._pre:
            self._emit(data.replace("\r\n", "\n").replace("\r", "\n"), verbatim=True)
            return
        # str.split() also folds U+00A0 (&nbsp;) runs, which in mail are layout padding.
        words = data.split()
        if not words:
            self._space = True
            return
        if data[0].isspace():
            self._space = True
        self._emit(" ".join(words))
        if data[-1].isspace():
            self._space = True
