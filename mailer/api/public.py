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
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.concurrency import run_in_threadpool

from mailer.api.deps import runtime
from mailer.config import PROJECT_ROOT
from mailer.mail.headers import parse_sender
from mailer.preferences.double_opt_in import DoubleOptIn
from mailer.preferences.self_service import SelfService
from mailer.preferences.tokens import BadToken, Token
from mailer.runtime import Runtime
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


@lru_cache(maxsize=8)
def _pages(folder: Path) -> Environment:
    # A deployment's own templates folder may restyle the pages; the shipped ones fill in.
    loader = ChoiceLoader([FileSystemLoader(str(folder / "_pages")),
                           FileSystemLoader(str(PROJECT_ROOT / "templates" / "_pages"))])
    return Environment(loader=loader, autoescape=select_autoescape(default=True),
                       undefined=StrictUndefined)


def _page(rt: Runtime, name: str, status: int = 200, **values: Any) -> HTMLResponse:
    organisation = parse_sender(rt.settings.mail_from)[0] or "Us"
    html = _pages(rt.settings.templates_dir).get_template(name).render(
        organisation=organisation, postal_address=rt.settings.postal_address or "", **values
    )
    return HTMLResponse(html, status_code=status, headers=dict(PAGE_HEADERS))


def _invalid(rt: Runtime) -> HTMLResponse:
    # 404 for malformed, forged and wrong-purpose tokens alike: which one it was is of
    # use only to someone probing the signer.
    return _page(rt, "invalid.html", 404,
                 reason="The link is incomplete, was changed, or is not meant for this page.")


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


#: Shown when a link that may not grant was used to ask for a grant.
REVOKE_ONLY_MESSAGE = (
    "We could not subscribe you: this link came in an email to an address that is not the "
    "one on your profile now, or in an email from before we could check that, so it can "
    "only unsubscribe. To subscribe, please use the link in a recent email from us."
)


# --- unsubscribe ------------------------------------------------------------------------


@router.get("/u/{token}", response_class=HTMLResponse)
@router.head("/u/{token}", response_class=HTMLResponse, include_in_schema=False)
def unsubscribe_page(token: str, rt: Rt) -> HTMLResponse:
    """Ask to confirm the unsubscribe; changes nothing."""
    found = _verify(rt, token, "u")
    if found is None:
        return _invalid(rt)
    title = SelfService(rt).topic_title(found.topic)
    return _page(rt, "unsubscribe.html", done=False, topic_title=title,
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
    title = await run_in_threadpool(service.topic_title, found.topic)
    preferences_url = await run_in_threadpool(_preferences_url, rt, found)
    return _page(rt, "unsubscribe.html", done=True, scope="all" if title is None else scope,
                 topic_title=title, preferences_url=preferences_url)


# --- preference centre ------------------------------------------------------------------


def _preferences(rt: Runtime, found: Token, message: str | None = None,
                 refused: bool = False) -> HTMLResponse:
    view = SelfService(rt).view(found)
    if view is None:
        return _page(rt, "invalid.html", 404,
                     reason="We hold no preferences for this link any more.")
    return _page(rt, "preferences.html", topics=view.topics,
                 third_party_sharing=view.third_party_sharing,
                 blocked_by=list(view.blocked_by), message=message,
                 may_grant=view.may_grant, refused=REVOKE_ONLY_MESSAGE if refused else None)


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
        message = "You are unsubscribed from all marketing email."
    else:
        ticked = set(fields.get("topic", []))
        wanted = {name: name in ticked for name in fields.get("shown", [])
                  if name != THIRD_PARTY_SHARING}
        if THIRD_PARTY_SHARING in fields.get("shown", []):
            wanted[THIRD_PARTY_SHARING] = bool(fields.get(THIRD_PARTY_SHARING))
        outcome = await run_in_threadpool(service.save, found, wanted, _evidence(request))
        refused = bool(outcome.refused)
        if outcome.changed:
            message = "Your choices are saved." if not refused else (
                "Your unsubscribes are saved.")
        else:
            message = "Nothing changed." if not refused else ""
    return await run_in_threadpool(_preferences, rt, found, message or None, refused)


# --- double opt-in confirmation ---------------------------------------------------------


@router.get("/confirm/{token}", response_class=HTMLResponse)
@router.head("/confirm/{token}", response_class=HTMLResponse, include_in_schema=False)
def confirm_page(token: str, rt: Rt) -> HTMLResponse:
    """Ask the person to confirm a pending subscription; changes nothing."""
    found = _verify(rt, token, "c")
    if found is None:
        return _invalid(rt)
    title = SelfService(rt).topic_title(found.topic) or found.topic
    state = DoubleOptIn(rt).state(found)
    return _page(rt, "confirm.html", state="already" if state == "confirmed" else state,
                 topic_title=title)


@router.post("/confirm/{token}", response_class=HTMLResponse)
async def confirm(token: str, request: Request, rt: Rt) -> HTMLResponse:
    """Confirm: the pending grant becomes a ledger grant with source ``double_opt_in``."""
    found = _verify(rt, token, "c")
    if found is None:
        return _invalid(rt)
    outcome = await run_in_threadpool(DoubleOptIn(rt).confirm, found, _evidence(request))
    title = await run_in_threadpool(SelfService(rt).topic_title, found.topic)
    return _page(rt, "confirm.html", state=outcome, topic_title=title or found.topic)
