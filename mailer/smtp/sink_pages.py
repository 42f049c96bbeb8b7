"""The sink view's HTML pages, and the Content-Security-Policies they are served under.

Captured mail is untrusted: its HTML part only ever appears in a sandboxed ``<iframe
srcdoc>`` behind its own policy (the reasons are in :mod:`mailer.smtp.sink_view`).
"""

from __future__ import annotations

import html
from urllib.parse import quote

from mailer.smtp.sink_mailbox import Captured, Summary

#: The page: nothing but itself and data: images; inline styles (captured mail relies on
#: them, and an ``about:srcdoc`` frame inherits this policy).
PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: Added again inside the frame's document, so the mail is held to it on its own too.
FRAME_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'"
#: The raw source: plain text, and a sandbox in case a browser sniffs it as HTML anyway.
RAW_POLICY = "default-src 'none'; sandbox"

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{background:#234;color:#fff;padding:.6em 1em}header a{color:#fff}
main{padding:1em}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #ddd;vertical-align:top}
tbody tr:hover{background:#f4f6f8}td a{display:block;color:inherit;text-decoration:none}
iframe{width:100%;height:60vh;border:1px solid #ccc;background:#fff}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.8em}
.headers th{width:14em;font-weight:600;color:#555}.muted{color:#777}
"""


def _esc(value: str) -> str:
    return html.escape(value, quote=True)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>"
            f"<header><a href=\"/\">Captured mail</a></header><main>{body}</main></body></html>\n")


def _link(name: str, suffix: str = "") -> str:
    return f"/m/{quote(name, safe='')}{suffix}"


def index_page(summaries: list[Summary], total: int) -> str:
    """The list of captured messages, newest first."""
    if not summaries:
        return _page("Captured mail", "<p>No mail captured yet.</p>")
    rows = "".join(
        f"<tr><td><a href=\"{_link(s.name)}\">{_esc(s.date)}</a></td>"
        f"<td><a href=\"{_link(s.name)}\">{_esc(s.sender)}</a></td>"
        f"<td><a href=\"{_link(s.name)}\">{_esc(s.to)}</a></td>"
        f"<td><a href=\"{_link(s.name)}\">{_esc(s.subject) or '(no subject)'}</a></td></tr>"
        for s in summaries
    )
    more = (f"<p class=\"muted\">{total - len(summaries)} older message(s) not listed.</p>"
            if total > len(summaries) else "")
    return _page("Captured mail", (
        f"<h1>Captured mail ({total})</h1><table><thead><tr><th>Date</th><th>From</th>"
        f"<th>To</th><th>Subject</th></tr></thead><tbody>{rows}</tbody></table>{more}"))


def frame_document(mail_html: str) -> str:
    """The captured HTML as the frame's document, behind its own CSP and no referrer."""
    # Put first, these land in the document's head whatever the mail's markup starts with.
    return (f"<meta http-equiv=\"Content-Security-Policy\" content=\"{FRAME_POLICY}\">"
            "<meta name=\"referrer\" content=\"no-referrer\"><base target=\"_blank\">"
            + mail_html)


def message_page(message: Captured) -> str:
    """One message: HTML part (sandboxed), text part, headers, and a link to the source."""
    s = message.summary
    parts = [f"<h1>{_esc(s.subject) or '(no subject)'}</h1>",
             f"<p class=\"muted\">{_esc(s.date)} &middot; from {_esc(s.sender)} to "
             f"{_esc(s.to)} &middot; <a href=\"{_link(s.name, '/raw')}\">source</a></p>"]
    if message.html is not None:
        # Without allow-scripts and allow-same-origin: see mailer.smtp.sink_view's docstring.
        parts.append(
            "<h2>HTML</h2><iframe title=\"HTML part\" referrerpolicy=\"no-referrer\" "
            "sandbox=\"allow-popups allow-popups-to-escape-sandbox\" "
            f"srcdoc=\"{_esc(frame_document(message.html))}\"></iframe>")
    if message.text is not None:
        parts.append(f"<h2>Text</h2><pre id=\"text-part\">{_esc(message.text)}</pre>")
    if message.html is None and message.text is None:
        parts.append("<p class=\"muted\">No text or HTML body part.</p>")
    rows = "".join(f"<tr><th>{_esc(name)}</th><td>{_esc(value)}</td></tr>"
                   for name, value in message.headers)
    parts.append(f"<h2>Headers</h2><table class=\"headers\"><tbody>{rows}</tbody></table>")
    return _page(s.subject or s.name, "".join(parts))
