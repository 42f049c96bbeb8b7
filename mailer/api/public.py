"""Public pages reached from links in mail: unsubscribe, preference centre, confirmation.

No API key: the signed token is the authority (SPEC 7). The rules every handler keeps:

- GET and HEAD change nothing. Mail scanners, link previews and security gateways fetch
  every URL in a message; a GET that unsubscribed would unsubscribe people at random.
- POST writes before it answers, answers 200 with a page, and never redirects: RFC 8058
  one-click clients do not follow redirects, and the commit must precede the answer.
- No cookies, no scripts, nothing loaded from another host, and no referrer sent on,
  because the token in the URL is a credential for this person's choices.
- Any valid link may take consent away; only a link mailed to the profile's current
  address may grant it (SPEC 3). Otherwise the page is still shown, says why, and
  writes no grant.
- Pages speak the language of the person the token names (their profile's ``locale``,
  SPEC 14), never one read from a cookie or guessed from the browser: the link is theirs,
  and so is the language. The words come from the gettext catalogues
  (:mod:`mailer.mail.translations`); topic titles from the topics' translations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from mailer.api.deps import runtime
from mailer.config import PROJECT_ROOT
from mailer.mail.headers import parse_sender
from mailer.mail.locales import translated
from mailer.mail.translations import catalogues_for
from mailer.preferences.double_opt_in import DoubleOptIn
from mailer.preferences.self_service import SelfService
from mailer.preferences.tokens import BadToken, Token
from mailer.runtime import Runtime
from mailer.store.schema import recipients, topics
from suppression.consent import THIRD_PARTY_SHARING

router = APIRouter(tags=["public pages"])
Rt = Annotated[Runtime, Depends(runtime)]

#: Sent with every page. The CSP forbids scripts, frames and any other host; forms may
#: post only back to us. ``no-store`` keeps shared caches from keeping someone's choices.
PAGE_HEADERS: Mapping[str, str] = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "X-Robots-Tag": "noindex, nofollow",
}

#: The RFC 8058 section 3.1 body a mail client posts for one-click unsubscribe.
ONE_CLICK_KEY, ONE_CLICK_VALUE = "List-Unsubscribe", "One-Click"
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_MAX_PLAIN_BODY = 64 * 1024


@lru_cache(maxsize=32)
def _pages(folder: Path, language: str) -> Environment:
    # A deployment's own templates folder may restyle the pages; the shipped ones fill in.
    loader = ChoiceLoader([FileSystemLoader(str(folder / "_pages")),
                           FileSystemLoader(str(PROJECT_ROOT / "templates" / "_pages"))])
    env = Environment(loader=loader, autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, extensions=["jinja2.ext.i18n"])
    env.install_gettext_translations(  # type: ignore[attr-defined]
        catalogues_for(folder).translations(language), newstyle=True)
    return env


def _page(rt: Runtime, name: str, status: int = 200, *, lang: str | None = None,
          **values: Any) -> HTMLResponse:
    organisation = parse_sender(rt.settings.mail_from)[0] or "Us"
    language = lang or _language(rt, None)
    html = _pages(rt.settings.templates_dir, language).get_template(name).render(
        organisation=organisation, postal_address=rt.settings.postal_address or "",
        lang=language, **values
    )
    return HTMLResponse(html, status_code=status,
                        headers={**PAGE_HEADERS, "Content-Language": language})


def _language(rt: Runtime, recipient_id: int | None) -> str:
    """The language of the pages for the person a token names (SPEC 14)."""
    locale: str | None = None
    if recipient_id is not None:
        with rt.engine.connect() as conn:
            locale = conn.execute(select(recipients.c.locale)
                                  .where(recipients.c.id == recipient_id)).scalar()
    return catalogues_for(rt.settings.templates_dir).language_for(
        locale, rt.settings.default_locale)


def _topic_title(rt: Runtime, name: str | None, language: str) -> str | None:
    """A topic's title in ``language``, or None when there is no such topic."""
    if name is None:
        return None
    with rt.engine.connect() as conn:
        row = conn.execute(select(topics.c.title, topics.c.translations)
                           .where(topics.c.name == name)).first()
    return None if row is None else translated(row.title, row.translations, "title", language)


def _invalid(rt: Runtime) -> HTMLResponse:
    # 404 for malformed, forged and wrong-purpose tokens alike: which one it was is of
    # use only to someone probing the signer. No token, no person: the default language.
    return _page(rt, "invalid.html", 404, reason="bad_link")


def _verify(rt: Runtime, token: str, purpose: str) -> Token | None:
    try:
        return rt.signer.verify(token, purpose)
    except BadToken:
        return None


async def _form(request: Request) -> dict[str, list[str]]:
    """The posted fields, from urlencoded or multipart bodies (RFC 8058 allows both)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, list[str]] = {}
    if content_type in _FORM_TYPES:
        form = await request.form()
        try:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    fields.setdefault(key, []).append(value)
        finally:
            await form.close()
        return fields
    # Some clients omit the Content-Type; a small urlencoded body still counts.
    body = await request.body()
    if len(body) <= _MAX_PLAIN_BODY:
        fields.update(parse_qs(body.decode("latin-1"), keep_blank_values=True))
    return fields


def _evidence(request: Request) -> dict[str, Any]:
    """Proof kept with a grant the person made on our pages (SPEC 3: IP, user agent)."""
    return {
        "page": request.url.path.split("/", 2)[1],
        "ip": request.client.host if request.client else None,
        "user_agent": request.headers.get("user-agent", "")[:300] or None,
    }


def _preferences_url(rt: Runtime, found: Token) -> str:
    return rt.url(f"/preferences/{SelfService(rt).preferences_token(found)}")


# --- unsubscribe ------------------------------------------------------------------------


@router.get("/u/{token}", response_class=HTMLResponse)
@router.head("/u/{token}", response_class=HTMLResponse, include_in_schema=False)
def unsubscribe_page(token: str, rt: Rt) -> HTMLResponse:
    """Ask to confirm the unsubscribe; changes nothing."""
    found = _verify(rt, token, "u")
    if found is None:
        return _invalid(rt)
    lang = _language(rt, found.recipient_id)
    title = _topic_title(rt, found.topic, lang)
    return _page(rt, "unsubscribe.html", lang=lang, done=False, topic_title=title,
                 preferences_url=_preferences_url(rt, found))


@router.post("/u/{token}", response_class=HTMLResponse)
async def unsubscribe(token: str, request: Request, rt: Rt) -> HTMLResponse:
    """RFC 8058 one-click or the page's form: revoke, commit, then answer 200."""
    found = _verify(rt, token, "u")
    if found is None:
        return _invalid(rt)
    fields = await _form(request)
    one_click = ONE_CLICK_VALUE in fields.get(ONE_CLICK_KEY, [])
    scope = "all" if not one_click and "all" in fields.get("scope", []) else "topic"
    service = SelfService(rt)
    if scope == "all":
        await run_in_threadpool(service.unsubscribe_all, found.recipient_id, "unsubscribe_link")
    else:
        source = "one_click" if one_click else "unsubscribe_link"
        await run_in_threadpool(service.unsubscribe, found.recipient_id, found.topic, source)
    lang = await run_in_threadpool(_language, rt, found.recipient_id)
    title = await run_in_threadpool(_topic_title, rt, found.topic, lang)
    preferences_url = await run_in_threadpool(_preferences_url, rt, found)
    return _page(rt, "unsubscribe.html", lang=lang, done=True,
                 scope="all" if title is None else scope, topic_title=title,
                 preferences_url=preferences_url)


# --- preference centre ------------------------------------------------------------------


def _preferences(rt: Runtime, found: Token, message: str | None = None,
                 refused: bool = False) -> HTMLResponse:
    view = SelfService(rt).view(found)
    if view is None:
        return _page(rt, "invalid.html", 404, reason="gone")
    lang = _language(rt, found.recipient_id)
    with rt.engine.connect() as conn:
        texts = {r.name: r.translations for r in conn.execute(
            select(topics.c.name, topics.c.translations))}
    shown = [replace(t, title=translated(t.title, texts.get(t.name), "title", lang),
                     description=translated(t.description, texts.get(t.name), "description",
                                            lang))
             for t in view.topics]
    return _page(rt, "preferences.html", lang=lang, topics=shown,
                 third_party_sharing=view.third_party_sharing,
                 blocked_by=list(view.blocked_by), message=message,
                 may_grant=view.may_grant, refused=refused)


@router.get("/preferences/{token}", response_class=HTMLResponse)
@router.head("/preferences/{token}", response_class=HTMLResponse, include_in_schema=False)
def preferences_page(token: str, rt: Rt) -> HTMLResponse:
    """Show every topic, third-party sharing and the unsubscribe-all choice; changes nothing."""
    found = _verify(rt, token, "p")
    if found is None:
        return _invalid(rt)
    return _preferences(rt, found)


@router.post("/preferences/{token}", response_class=HTMLResponse)
async def save_preferences(token: str, request: Request, rt: Rt) -> HTMLResponse:
    """Record ``preference_center`` events for the choices that changed, then show the page."""
    found = _verify(rt, token, "p")
    if found is None:
        return _invalid(rt)
    fields = await _form(request)
    service = SelfService(rt)
    refused = False
    if "unsubscribe_all" in fields.get("action", []):
        await run_in_threadpool(service.unsubscribe_all, found.recipient_id, "preference_center")
        message = "all_unsubscribed"
    else:
        ticked = set(fields.get("topic", []))
        wanted = {name: name in ticked for name in fields.get("shown", [])
                  if name != THIRD_PARTY_SHARING}
        if THIRD_PARTY_SHARING in fields.get("shown", []):
            wanted[THIRD_PARTY_SHARING] = bool(fields.get(THIRD_PARTY_SHARING))
        outcome = await run_in_threadpool(service.save, found, wanted, _evidence(request))
        refused = bool(outcome.refused)
        # Codes: the page words them in the person's language.
        if outcome.changed:
            message = "unsubscribes_saved" if refused else "saved"
        else:
            message = "" if refused else "nothing"
    return await run_in_threadpool(_preferences, rt, found, message or None, refused)


# --- double opt-in confirmation ---------------------------------------------------------


@router.get("/confirm/{token}", response_class=HTMLResponse)
@router.head("/confirm/{token}", response_class=HTMLResponse, include_in_schema=False)
def confirm_page(token: str, rt: Rt) -> HTMLResponse:
    """Ask the person to confirm a pending subscription; changes nothing."""
    found = _verify(rt, token, "c")
    if found is None:
        return _invalid(rt)
    lang = _language(rt, found.recipient_id)
    title = _topic_title(rt, found.topic, lang) or found.topic
    state = DoubleOptIn(rt).state(found)
    return _page(rt, "confirm.html", lang=lang,
                 state="already" if state == "confirmed" else state, topic_title=title)


@router.post("/confirm/{token}", response_class=HTMLResponse)
async def confirm(token: str, request: Request, rt: Rt) -> HTMLResponse:
    """Confirm: the pending grant becomes a ledger grant with source ``double_opt_in``."""
    found = _verify(rt, token, "c")
    if found is None:
        return _invalid(rt)
    outcome = await run_in_threadpool(DoubleOptIn(rt).confirm, found, _evidence(request))
    lang = await run_in_threadpool(_language, rt, found.recipient_id)
    title = await run_in_threadpool(_topic_title, rt, found.topic, lang)
    return _page(rt, "confirm.html", lang=lang, state=outcome,
                 topic_title=title or found.topic)
