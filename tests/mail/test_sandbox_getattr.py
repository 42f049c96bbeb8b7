"""DictSandbox's shortcut to a dict's keys gives what jinja2's own sandbox gives."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jinja2 import StrictUndefined, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailer.errors import TemplateError
from mailer.mail.sandbox import DictSandbox
from mailer.mail.templates import Template
from suppression.policy import Category

_REFERENCE = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
_OURS = DictSandbox(undefined=StrictUndefined)

# Names a dict has as attributes (methods, dunders) next to ordinary and private keys.
_NAMES = st.sampled_from(["date", "items", "keys", "get", "values", "copy", "__class__",
                          "__dict__", "_private", "mro", "", "amount", "fromkeys"]) | st.text(
    max_size=8)


def _same(ours: Any, reference: Any) -> None:
    if isinstance(reference, Undefined):
        assert isinstance(ours, Undefined) and type(ours) is type(reference)
        assert ours._undefined_name == reference._undefined_name
        assert ours._undefined_hint == reference._undefined_hint
    else:
        assert ours == reference and type(ours) is type(reference)


@given(st.dictionaries(_NAMES, st.integers() | st.text(max_size=5)), _NAMES)
def test_dict_lookup_equals_the_sandbox(data: dict[str, Any], name: str) -> None:
    _same(_OURS.getattr(data, name), _REFERENCE.getattr(data, name))


class _Dict(dict[str, Any]):
    """A dict subclass may carry attributes of its own: it takes jinja2's path."""

    date = "attribute"


def test_other_types_take_the_sandbox_path() -> None:
    assert _OURS.getattr(_Dict(date="key"), "date") == "attribute"
    # A method of a dict is still what an attribute name finds, key or not.
    data = {"items": 1}
    assert _OURS.getattr(data, "items") == data.items
    # Internal attributes stay refused.
    assert isinstance(_OURS.getattr({}, "__class__"), Undefined)


def test_template_renders_keys_and_refuses_missing() -> None:
    template = Template(name="t", subject="{{ item.date }}",
                        html="{% for i in items %}{{ i.what }}/{{ i.items }}{% endfor %}",
                        category=Category.SERVICE_ALERT, topic=None)
    rendered = template.render({"item": {"date": "today"},
                                "items": [{"what": "a", "items": "k"}, {"what": "b"}]},
                               derive_text=False)
    assert rendered.subject == "today"
    # "items" is a dict method: jinja2 finds the method before the key, so must we.
    assert rendered.html.startswith("a/&lt;built-in method items of dict")
    # A key the dict lacks is still an error, not a blank (StrictUndefined).
    with pytest.raises(TemplateError):
        template.render({"item": {}, "items": []}, derive_text=False)
