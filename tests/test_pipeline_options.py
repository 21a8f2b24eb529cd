"""The option table is the one source of truth: signature, policies and docs agree with it."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Any

import pytest

import opero
from opero._pipeline.options import OPTION_NAMES, OPTIONS, RULES, STAGES
from opero._pipeline.policy import STAGE_POLICIES, stage_fields

DOCS = Path(__file__).resolve().parent.parent / "docs" / "opero.md"


def _typed_signature() -> inspect.Signature:
    """Return the signature of the keyword-options overload of ``opero()``."""
    overloads = typing.get_overloads(opero.opero)
    keyword = [
        inspect.signature(o) for o in overloads if "retries" in inspect.signature(o).parameters
    ]
    assert len(keyword) == 1, "opero() must have one typed overload taking the options"
    return keyword[0]


def _doc_default(value: Any) -> str:
    """Write a default the way docs/opero.md does (``Exception``, ``"memory"``, ``None``)."""
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], type):
        return value[0].__name__
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _doc_rows() -> dict[str, list[str]]:
    """Return the cells of every row of the option tables under "## All options"."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## All options", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.match(r"\| `([a-z_]+)` \|", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split("|")]
    return rows


def test_typed_signature_matches_the_table() -> None:
    """The typed opero() overload has exactly the table's options, with the same defaults."""
    params = _typed_signature().parameters
    assert list(params) == [o.name for o in OPTIONS]
    for option in OPTIONS:
        default = params[option.name].default
        assert params[option.name].kind is inspect.Parameter.KEYWORD_ONLY
        if default is not Ellipsis:  # ``...`` stands for a default a type cannot spell
            assert default == option.default, option.name


def test_docs_tables_match_the_table() -> None:
    """docs/opero.md documents every public option, no other, with the table's default."""
    rows = _doc_rows()
    assert set(rows) == OPTION_NAMES
    for option in OPTIONS:
        if option.private:
            continue
        cells = rows[option.name]
        if len(cells) >= 4:  # name | type | default | meaning (callbacks have no default column)
            assert cells[2].startswith(f"`{_doc_default(option.default)}`"), option.name


def test_docstring_names_every_public_option() -> None:
    """help(opero.opero) mentions every public option by name."""
    doc = opero.opero.__doc__ or ""
    missing = [name for name in sorted(OPTION_NAMES) if f"``{name}" not in doc]
    assert missing == []


def test_stage_policies_have_the_table_fields() -> None:
    """Each per-stage policy declares exactly the fields of its stage's options."""
    assert set(STAGE_POLICIES) == set(STAGES)
    for stage in STAGES:
        assert stage_fields(stage) == {o.field for o in OPTIONS if o.stage == stage}, stage


def test_table_rows_are_well_formed() -> None:
    """Names are unique, private ones start with an underscore, every row has a one-line doc."""
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    for option in OPTIONS:
        assert option.private == option.name.startswith("_"), option.name
        assert option.stage in STAGES, option.name
        assert option.doc, option.name
        assert "\n" not in option.doc, option.name


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.default is not None], ids=str)
def test_defaults_pass_their_own_check(option: Any) -> None:
    """Every non-None default is accepted by its option's check, unchanged."""
    assert option.check(option.name, option.default) == option.default


def test_policy_reads_every_option_flat_and_by_stage() -> None:
    """A decorated function's policy exposes each given option by stage and flat."""
    decorated = opero.opero(retries=2, rate_limit=4.0, cache=True, cache_ttl=9.0)(lambda x: x)
    policy = decorated.__opero__.policy
    assert (policy.retry.retries, policy.retries) == (2, 2)
    assert (policy.rate.rate_limit, policy.rate_limit) == (4.0, 4.0)
    assert (policy.caching.cache_ttl, policy.cache_ttl) == (9.0, 9.0)
    with pytest.raises(AttributeError, match="no_such_option"):
        _ = policy.no_such_option


def test_rules_are_documented_functions() -> None:
    """Each cross-option rule has a docstring saying what it enforces."""
    assert RULES
    for rule in RULES:
        assert (rule.__doc__ or "").strip(), rule.__name__
