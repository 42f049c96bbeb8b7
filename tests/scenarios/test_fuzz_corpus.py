"""The fuzzing corpus (``tests/fuzz/*.json``) fed through the real app: never a 500.

The corpus is data: hostile header values, addresses, link tokens, request bodies, stored
templates and webhook bodies, each with the answer the API owes it (SPEC 6, 7, 8). Values
too large or too repetitive to write out are small macros, expanded here:

- ``{"$repeat": [value, n]}``, ``{"$join": [part, ...]}``, ``{"$list": [item, n]}``,
  ``{"$numbered": [text with {i}, n]}``, ``{"$hex": "ff00"}`` (bytes), ``{"$quote": value}``
  (percent-encoded for a URL path);
- ``{"$email": prefix}`` and ``{"$name": prefix}``: a fresh address or name per request;
- ``{"$fixture": file}``, ``{"$fixture_head": [file, n]}``,
  ``{"$fixture_replace": [file, old, new]}``: a webhook fixture from tests/webhooks/fixtures;
- the strings ``"$payload"`` and ``"$address"``: the entry being tried, where a field of
  headers.json or addresses.json takes it.

Every request goes through the real FastAPI app on SQLite, or PostgreSQL with
``MAILER_TEST_DB=postgresql``, in a database of its own: the corpus leaves hundreds of rows
(topics, templates, suppressions of the fixed addresses it tries) that other tests must not
see. Queued message ids go to an in-memory queue, not to the shared Redis.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DSN_TOKEN, auth, unique_email

CORPUS = Path(__file__).parent.parent / "fuzz"
FIXTURES = Path(__file__).parent.parent / "webhooks" / "fixtures"
#: Accepted stored templates must compile and render (or be stopped) within this.
TEMPLATE_SECONDS = 1.0
#: What a plain-text field refuses (headers.json, ``refused_when: control``).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
#: The worst compile+render time seen, printed at the end of the template cases.
WORST: dict[str, tuple[float, str]] = {}


def corpus(name: str) -> dict[str, Any]:
    """One corpus file."""
    loaded: dict[str, Any] = json.loads((CORPUS / name).read_text())
    return loaded


def expand(value: Any, slots: dict[str, Any] | None = None) -> Any:
    """``value`` with its macros expanded and its ``$payload``/``$address`` filled in."""
    slots = slots or {}
    if isinstance(value, str):
        return slots.get(value, value)
    if isinstance(value, list):
        return [expand(v, slots) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)).startswith("$"):
        [(op, arg)] = value.items()
        return _macro(op, expand(arg, slots) if op != "$list" else arg, slots)
    return {k: expand(v, slots) for k, v in value.items()}


def _macro(op: str, arg: Any, slots: dict[str, Any]) -> Any:
    if op == "$repeat":
        return arg[0] * arg[1]
    if op == "$join":
        if any(isinstance(part, bytes) for part in arg):
            return b"".join(p if isinstance(p, bytes) else p.encode() for p in arg)
        return "".join(arg)
    if op == "$list":
        return [expand(arg[0], slots)] * arg[1]
    if op == "$numbered":
        return "".join(arg[0].replace("{i}", str(i)) for i in range(arg[1]))
    if op == "$hex":
        return bytes.fromhex(arg)
    if op == "$quote":
        return urllib.parse.quote(arg, safe="", errors="surrogatepass")
    if op == "$email":
        return unique_email(arg)
    if op == "$name":
        return f"{arg}-{uuid.uuid4().hex[:10]}"
    if op == "$fixture":
        return (FIXTURES / arg).read_bytes()
    if op == "$fixture_head":
        return (FIXTURES / arg[0]).read_bytes()[: arg[1]]
    if op == "$fixture_replace":
        return (FIXTURES / arg[0]).read_bytes().replace(arg[1].encode(), arg[2].encode())
    raise AssertionError(f"unknown corpus macro {op}")


def _auth(role: str, keys: dict[str, str]) -> dict[str, str]:
    if role == "none":
        return {}
    if role == "bogus":
        return auth("mk_bogus_" + "0" * 40)
    if role == "dsn":
        return auth(DSN_TOKEN)
    if role == "dsn-prefix":
        return auth(DSN_TOKEN[:-1])
    if role == "dsn-basic":
        return {"Authorization": f"Basic {DSN_TOKEN}"}
    return auth(keys[role])


def _chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


def send(client: Any, keys: dict[str, str], request: dict[str, Any],
         slots: dict[str, Any] | None = None) -> Any:
    """Send one corpus request (expanded) through the app."""
    req = expand(request, slots)
    headers = {**_auth(req.get("auth", "none"), keys), **req.get("headers", {})}
    content: Any = None
    if "json" in req:
        # json.dumps escapes lone surrogates and writes NaN as the caller would; httpx's
        # own encoder would refuse both before the request left the test.
        content = json.dumps(req["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    elif "body" in req:
        body = req["body"]
        content = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
        headers.setdefault("Content-Type", req.get("content_type", "application/json"))
        if req.get("chunked"):
            content = _chunks(content)
    return client.request(req["method"], req["path"], content=content, headers=headers)


def check(response: Any, statuses: list[int], codes: list[str] | None = None) -> None:
    """The answer is one of ``statuses`` (never a 500), with a SPEC error body on a 4xx."""
    assert response.status_code < 500, response.text[:300]
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    is_json = response.headers.get("content-type", "").startswith("application/json")
    if response.status_code >= 400 and is_json:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "details"}
        if codes:
            assert error["code"] in codes, error


@pytest.fixture(scope="module")
def corpus_runtime(db_url: str, env: dict[str, str],
                   tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A runtime like the web process's, on a fresh database of the same kind."""
    from mailer.config import Settings
    from mailer.runtime import Runtime
    from mailer.sending.queue import ListEnqueuer
    from mailer.store.db import upgrade

    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'corpus.db'}"
    else:
        import psycopg
        from psycopg import sql
        from sqlalchemy.engine import make_url

        base = make_url(db_url)
        name = f"fuzz_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(host=base.host, port=base.port, user=base.username,
                             dbname=base.database, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = base.set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    settings = Settings.from_environ({**env, "MAILER_DATABASE_URL": url})
    return Runtime.from_settings(settings, ListEnqueuer())


@pytest.fixture(scope="module")
def corpus_client(corpus_runtime: Any) -> Iterator[Any]:
    """An HTTP client for the real app on the corpus's own database."""
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app

    with TestClient(create_app(corpus_runtime)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def corpus_keys(corpus_runtime: Any) -> dict[str, str]:
    """One API key per role for the whole corpus."""
    from mailer.keys import create_key

    scopes = {"transactional": ["messages:transactional"], "marketing": ["marketing"],
              "recipients": ["recipients"], "admin": ["admin"]}
    with corpus_runtime.engine.begin() as conn:
        return {name: create_key(conn, f"fuzz-{name}", s) for name, s in scopes.items()}


# --- header payloads --------------------------------------------------------------------

HEADERS = corpus("headers.json")


def _header_cases() -> list[Any]:
    return [pytest.param(field, payload, id=f"{field['id']}:{payload['id']}")
            for field in HEADERS["fields"] for payload in HEADERS["payloads"]]


@pytest.mark.parametrize(("field", "payload"), _header_cases())
def test_header_payloads(corpus_client: Any, corpus_keys: dict[str, str], field: dict[str, Any],
                         payload: dict[str, Any]) -> None:
    # Given a payload placed where caller text reaches a header (or, for plain-text
    # fields, where it reaches a page)
    value = expand(payload["value"])
    if field.get("refused_when") == "control":
        refused = bool(_CONTROL.search(value)) or len(value) > field["max_length"]
    else:
        refused = payload["refused"] or not field["accepted"]
    # When it is sent
    response = send(corpus_client, corpus_keys, field["request"], {"$payload": value})
    # Then a refused payload is a 422 naming the problem, any other is accepted
    if refused:
        check(response, field.get("refused_status", [422]), field["refused_codes"])
    else:
        check(response, field["accepted"])
        if "render" in field:
            body = expand(field["request"]["json"], {"$payload": value})
            _assert_template_is_fast(f"headers:{payload['id']}", body, field["render"])


# --- addresses --------------------------------------------------------------------------

ADDRESSES = corpus("addresses.json")


def _address_cases() -> list[Any]:
    return [pytest.param(field, address, id=f"{field['id']}:{address['id']}")
            for field in ADDRESSES["fields"] for address in ADDRESSES["addresses"]]


@pytest.mark.parametrize(("field", "address"), _address_cases())
def test_addresses(corpus_client: Any, corpus_keys: dict[str, str], field: dict[str, Any],
                   address: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    value = expand(address["value"])
    # When the address is sent where the API takes one
    response = send(corpus_client, corpus_keys, field["request"], {"$address": value})
    # Then a valid one is accepted and an invalid one is a 422 invalid_address
    # (validation_error where the schema's 320-character cap comes first; NUL or a lone
    # surrogate makes the whole body unstorable_value, a batch included)
    codes = ["invalid_address", "validation_error", "unstorable_value"]
    if address["valid"]:
        check(response, field["accepted"])
    elif field.get("batch") and response.status_code == 202:
        result = response.json()["results"][0]
        assert result["error"]["code"] in codes, result
    else:
        check(response, [422], codes)
    if field.get("batch") and address["valid"]:
        assert "error" not in response.json()["results"][0], response.text
    if not address["valid"] and len(value) >= 8:
        assert value[:30] not in response.text
    # And no log line carries the address, nor a recognisable local part of it
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert value[:60] not in logged if len(value) >= 8 else True
    local = value.partition("@")[0]
    if len(set(local)) >= 4:
        assert local not in logged


# --- link tokens ------------------------------------------------------------------------

TOKENS = corpus("tokens.json")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_NEXT_PURPOSE = {"u": "p", "p": "c", "c": "u"}


def _flip(text: str, index: int) -> str:
    char = text[index]
    swapped = _B64[(_B64.index(char) + 1) % 64] if char in _B64 else "A"
    return text[:index] + swapped + text[index + 1:]


def mutate(runtime: Any, mutation: str, purpose: str, recipient: Any) -> str:
    """A token for ``recipient``, changed as ``mutation`` says."""
    from mailer.preferences.tokens import TokenSigner

    signer = runtime.signer
    topic = "newsletter"
    token: str = signer.sign(purpose, recipient.id, topic, recipient.email_hash)
    kid, payload, signature = token.split(".")
    if mutation == "valid":
        return token
    if mutation == "unbound":
        unbound: str = signer.sign(purpose, recipient.id, topic)
        return unbound
    other = {
        "truncated-1": token[:-1],
        "truncated-half": token[: len(token) // 2],
        "signature-only": signature,
        "bit-flip-signature": f"{kid}.{payload}.{_flip(signature, len(signature) - 2)}",
        "bit-flip-payload": f"{kid}.{_flip(payload, 0)}.{signature}",
        "bit-flip-key-id": f"{_flip(kid, 0)}.{payload}.{signature}",
        "wrong-purpose": signer.sign(_NEXT_PURPOSE[purpose], recipient.id, topic,
                                     recipient.email_hash),
        "other-key": TokenSigner("another-secret-key-0123456789abcdef").sign(
            purpose, recipient.id, topic, recipient.email_hash),
        "other-recipient-same-signature": ".".join([
            kid, signer.sign(purpose, recipient.id + 1, topic).split(".")[1], signature]),
        "extra-segment": token + ".x",
        "padded-signature": token + "==",
        "uppercased": token.upper(),
        "doubled": token + token,
    }
    return other[mutation]


@pytest.fixture(scope="module")
def token_recipient(corpus_client: Any, corpus_keys: dict[str, str], corpus_runtime: Any) -> Any:
    """A fresh recipient the tokens are minted for."""
    from mailer.store.recipients import get_recipient

    external_id = f"fuzz-{uuid.uuid4().hex[:10]}"
    r = corpus_client.put(f"/v1/recipients/{external_id}", json={"email": unique_email("tok")},
                   headers=auth(corpus_keys["recipients"]))
    assert r.status_code == 201, r.text
    with corpus_runtime.engine.connect() as conn:
        return get_recipient(conn, external_id)


def _token_cases() -> list[Any]:
    cases = []
    for page in TOKENS["pages"]:
        for method in TOKENS["methods"]:
            cases += [pytest.param(page, method, mutation, None,
                                   id=f"{method}{page['prefix']}{mutation['id']}")
                      for mutation in TOKENS["mutations"]]
            cases += [pytest.param(page, method, None, raw,
                                   id=f"{method}{page['prefix']}raw-{raw['id']}")
                      for raw in TOKENS["raw"]]
    return cases


@pytest.mark.parametrize(("page", "method", "mutation", "raw"), _token_cases())
def test_tokens(corpus_client: Any, corpus_runtime: Any, token_recipient: Any, page: dict[str, Any],
                method: str, mutation: dict[str, Any] | None, raw: dict[str, Any] | None) -> None:
    # Given a valid token, mutated, or a raw string where a token goes
    if mutation is not None:
        token = mutate(corpus_runtime, mutation["id"], page["purpose"], token_recipient)
        accepted = mutation["accepted"]
    else:
        assert raw is not None
        token, accepted = expand(raw["token"]), False
    path = page["prefix"] + urllib.parse.quote(token, safe="", errors="surrogatepass")
    # When the page is fetched or posted (an empty form: the page's own button)
    response = corpus_client.request(method, path, data={} if method == "POST" else None)
    # Then only a genuine token shows the page; anything else is a 4xx, never a 500
    assert response.status_code < 500, response.text[:300]
    if accepted:
        assert response.status_code == 200, response.text[:300]
    else:
        assert response.status_code in (400, 404, 405, 414, 422), response.status_code


# --- whole requests: bodies, limits, odd values -----------------------------------------

REQUESTS = corpus("requests.json")


@pytest.mark.parametrize("case", REQUESTS["cases"], ids=[c["id"] for c in REQUESTS["cases"]])
def test_requests(corpus_client: Any, corpus_keys: dict[str, str], case: dict[str, Any]) -> None:
    # When the request is sent
    response = send(corpus_client, corpus_keys, case["request"])
    # Then it gets one of the answers the corpus allows, never a 500
    check(response, case["status"], [case["code"]] if case.get("code") else None)
    if case.get("all_errors"):
        assert all("error" in r for r in response.json()["results"]), response.text


# --- stored templates -------------------------------------------------------------------

TEMPLATES = corpus("templates.json")


def _assert_template_is_fast(case_id: str, body: dict[str, Any], data: dict[str, Any]) -> None:
    """Compile and render an accepted template in-process; both within a second."""
    from mailer.errors import TemplateError
    from mailer.mail.stored import StoredTemplate

    started = time.perf_counter()
    template = StoredTemplate("fuzz", body["topic"], body["subject"], body["html"],
                              body.get("text"))
    compiled = time.perf_counter()
    outcome = "rendered"
    try:
        template.render(data)
    except TemplateError as exc:
        outcome = exc.code  # the render budget stopped it: that is the bound working
    done = time.perf_counter()
    total = done - started
    print(f"{case_id}: compile {compiled - started:.3f}s render {done - compiled:.3f}s "
          f"({outcome})")
    if total > WORST.get("total", (0.0, ""))[0]:
        WORST["total"] = (total, case_id)
    assert total < TEMPLATE_SECONDS, f"{case_id} took {total:.2f}s"


@pytest.mark.parametrize("case", TEMPLATES["templates"],
                         ids=[c["id"] for c in TEMPLATES["templates"]])
def test_stored_templates(corpus_client: Any, corpus_keys: dict[str, str],
                          case: dict[str, Any]) -> None:
    body = {"category": "promotion", "topic": "newsletter", "subject": expand(case["subject"]),
            "html": expand(case["html"])}
    if case["text"] is not None:
        body["text"] = expand(case["text"])
    # When the template is stored
    started = time.perf_counter()
    response = corpus_client.put(f"/v1/templates/fuzz-{uuid.uuid4().hex[:10]}",
                          content=json.dumps(body).encode(),
                          headers={**auth(corpus_keys["marketing"]),
                                   "Content-Type": "application/json"})
    elapsed = time.perf_counter() - started
    # Then a template outside the bounds is a 422 with its code, quickly
    if case["expect"] == "refused":
        check(response, [422], [case["code"]])
        assert elapsed < TEMPLATE_SECONDS, f"refusing took {elapsed:.2f}s"
        return
    # And an accepted one compiles and renders (or is stopped) within a second
    check(response, [201])
    _assert_template_is_fast(case["id"], body, expand(case["data"]))


def test_worst_template_time_is_reported() -> None:
    # Runs after the template cases (file order): prints the slowest accepted template.
    if WORST:
        seconds, case_id = WORST["total"]
        print(f"slowest accepted template: {case_id} {seconds:.3f}s")
        assert seconds < TEMPLATE_SECONDS


# --- webhooks ---------------------------------------------------------------------------

WEBHOOKS = corpus("webhooks.json")


@pytest.mark.parametrize("case", WEBHOOKS["cases"], ids=[c["id"] for c in WEBHOOKS["cases"]])
def test_webhook_bodies(corpus_client: Any, corpus_keys: dict[str, str],
                        case: dict[str, Any]) -> None:
    path = case.get("path", "/webhooks/dsn")
    if case.get("query") == "token":
        path += f"?token={DSN_TOKEN}"
    request = {"method": "POST", "path": path, "auth": case["auth"], "body": case["body"],
               "content_type": case.get("content_type", "message/rfc822")}
    # When the body is posted (twice for a replay)
    response = send(corpus_client, corpus_keys, request)
    if case.get("replay"):
        check(response, case["status"])
        response = send(corpus_client, corpus_keys, request)
    # Then forged ones are refused, malformed ones are 4xx, and nothing is a 500
    check(response, case["status"])
    if case.get("replay"):
        assert response.json()["applied"] == 0, response.text


def test_topic_names_fit_a_list_id(corpus_client: Any, corpus_keys: dict[str, str],
                                   corpus_runtime: Any) -> None:
    from sqlalchemy import select

    from mailer.api.recipients import TOPIC_NAME
    from mailer.store.schema import topics

    # Given the topics created on first start, Then each is a valid List-Id label already
    with corpus_runtime.engine.connect() as conn:
        names = [row.name for row in conn.execute(select(topics.c.name))]
    assert {"newsletter", "product_updates", "partner_offers"} <= set(names)
    assert all(TOPIC_NAME.fullmatch(n) for n in ("newsletter", "product_updates",
                                                  "partner_offers"))
    # When a dotted ASCII name is stored, Then it is created
    name = f"spring.sale-{uuid.uuid4().hex[:6]}_v2"
    r = corpus_client.put(f"/v1/topics/{name}", json={"title": "Spring sale"},
                   headers=auth(corpus_keys["marketing"]))
    assert r.status_code == 201, r.text
    # And names a List-Id could not carry are a 422 invalid_topic_name
    for bad in ("caf\u00e9", "News", "a..b", "a.", ".a", "-a", "a" * 65, "third_party_sharing"):
        r = corpus_client.put(f"/v1/topics/{urllib.parse.quote(bad)}", json={"title": "T"},
                       headers=auth(corpus_keys["marketing"]))
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_topic_name"), bad
