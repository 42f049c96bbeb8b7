"""The message every scenario sends: a ~3 KB HTML account-activity notice and its data.

The pipeline renders it from a template folder laid next to a copy of the shipped
templates; the naive peer renders the same HTML (and an equivalent text template) with
plain jinja2; the raw blast sends it pre-built.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

#: The template's name in the catalogue.
TEMPLATE = "bench_activity"
#: The same body as a newsletter promotion, for the campaign scenario.
CAMPAIGN_TEMPLATE = "bench_digest"
#: Sender of every scenario.
MAIL_FROM = "Example <no-reply@example.test>"
#: DKIM signing domain (the From domain: DMARC alignment, SPEC 6) and selector, for the
#: deployment and the signed blast.
DKIM_DOMAIN, DKIM_SELECTOR = "example.test", "bench"

SUBJECT = "{{ title }}"

HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;line-height:1.5;color:#222}td{padding:4px 8px}
.muted{color:#777;font-size:.9em}</style></head>
<body>
<div style="max-width:600px;margin:0 auto">
<h1 style="font-size:1.3em">{{ title }}</h1>
<p>Hello {{ name }},</p>
<p>{{ body }}</p>
<p>Here is what happened on your account since your last statement. If any of these
entries looks unfamiliar, please <a href="https://example.test/support?ref=activity">contact
support</a> straight away so that we can look into it for you.</p>
<table role="presentation" style="border-collapse:collapse;width:100%">
<tr><th align="left">Date</th><th align="left">Description</th><th align="right">Amount</th></tr>
{% for item in items %}<tr><td>{{ item.date }}</td><td>{{ item.what }}</td>
<td align="right">{{ item.amount }}</td></tr>
{% endfor %}</table>
<p>Your balance is <b>{{ balance }}</b>. You can see every entry, download statements and
change how we notify you on your <a href="https://example.test/account">account page</a>.</p>
<ul>
<li>Statements are kept for seven years and can be downloaded at any time.</li>
<li>We will never ask for your password by email or by phone.</li>
<li>Notices like this one are sent at most three times a week.</li>
</ul>
<p>Thank you for being with us &mdash; the Example team.</p>
<p class="muted">Example Ltd, 1 Example Street, 00000 Example City. This is a service
notice about your account; it is not marketing and it is sent whatever your marketing
choices are. Questions? Reply to this message or write to support@example.test.</p>
<p class="muted">Reference: {{ reference }}</p>
</div>
</body></html>
"""

#: What a hand-rolled sender would write as the text part (the pipeline derives its own).
TEXT = """{{ title }}

Hello {{ name }},

{{ body }}

Here is what happened on your account since your last statement. If any of these
entries looks unfamiliar, please contact support straight away
(https://example.test/support?ref=activity).

{% for item in items %}{{ item.date }}  {{ item.what }}  {{ item.amount }}
{% endfor %}
Your balance is {{ balance }}. Account page: https://example.test/account

- Statements are kept for seven years and can be downloaded at any time.
- We will never ask for your password by email or by phone.
- Notices like this one are sent at most three times a week.

Thank you for being with us - the Example team.

Example Ltd, 1 Example Street, 00000 Example City.
Reference: {{ reference }}
"""

_TOML = f"""category = "service_alert"
subject = "{SUBJECT}"
description = "Benchmark: an account activity notice."
required = ["name", "title", "body", "items", "balance", "reference"]
"""

_PROMO_TOML = f"""category = "promotion"
topic = "newsletter"
subject = "{SUBJECT}"
description = "Benchmark: the activity notice's body as a newsletter."
required = ["name", "title", "body", "items", "balance", "reference"]
"""


def address(run: str, index: int) -> str:
    """The recipient address of message ``index`` in run ``run`` (unique per run)."""
    return f"user{index}.{run}@example.org"


def data(index: int) -> dict[str, Any]:
    """The template variables of message ``index``."""
    return {
        "name": f"Customer {index}",
        "title": "Your account activity this week",
        "body": "A short summary of the latest movements on your account follows.",
        "items": [
            {"date": f"2030-01-0{day}", "what": f"Card payment, shop no. {index % 97 + day}",
             "amount": f"-{(index * day) % 300 + 1}.{day}0 EUR"}
            for day in range(1, 6)
        ],
        "balance": f"{index % 5000}.00 EUR",
        "reference": f"ACT-{index:08d}",
    }


def lay_templates(source: Path, target: Path) -> Path:
    """Copy the shipped templates to ``target`` and add the benchmark template."""
    shutil.copytree(source, target)
    folder = target / TEMPLATE
    folder.mkdir()
    (folder / "template.toml").write_text(_TOML)
    (folder / "body.html").write_text(HTML)
    promo = target / CAMPAIGN_TEMPLATE
    promo.mkdir()
    (promo / "template.toml").write_text(_PROMO_TOML)
    (promo / "body.html").write_text(HTML)
    return target
