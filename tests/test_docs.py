"""The documentation in ``docs/`` stays true to the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
#: ``[text](target)`` links in Markdown.
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_variable_config_reads_is_documented() -> None:
    # Given the MAILER_* names mailer/config.py reads (get("NAME"...), and the webhook
    # variables it gathers by prefix)
    source = (ROOT / "mailer/config.py").read_text()
    names = set(re.findall(r'get(?:_int|_duration)?\("([A-Z0-9_]+)"', source))
    assert len(names) > 40
    documented = (ROOT / "docs/configuration.md").read_text()
    # Then each has its row in docs/configuration.md
    missing = sorted(n for n in names if f"MAILER_{n}" not in documented)
    assert missing == []
    for variable in ("MAILER_SES_TOPIC_ARNS", "MAILER_SNS_CERT_DIR", "MAILER_DSN_WEBHOOK_TOKEN",
                     "MAILER_SENDGRID_PUBLIC_KEY", "MAILER_MAILGUN_SIGNING_KEY",
                     "MAILER_POSTMARK_WEBHOOK_USER", "MAILER_POSTMARK_WEBHOOK_PASSWORD"):
        assert variable in documented


def test_links_stay_inside_the_repository_and_resolve() -> None:
    # Given every link in docs/ and the README
    for page in [*DOCS, ROOT / "README.md"]:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = target.split("#", 1)[0]
            if not path:
                continue  # a link within the page
            resolved = (page.parent / path).resolve()
            if page.parent == ROOT / "docs" or path.startswith("docs/"):
                # Then the docs' own links point at files of this repository that exist
                assert resolved.is_relative_to(ROOT), (page.name, target)
                assert resolved.exists(), (page.name, target)
                anchor = target.partition("#")[2]
                if anchor and resolved.suffix == ".md":
                    # And a #section names a heading of that page
                    assert anchor in anchors(resolved), (page.name, target)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_docs_name_no_hosts_but_examples() -> None:
    # Then the docs link to no page outside the repository
    for page in DOCS:
        for target in LINK.findall(page.read_text()):
            assert not target.startswith(("http://", "https://")), (page.name, target)
