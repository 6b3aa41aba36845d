"""The packaged schema is internally consistent."""

from __future__ import annotations

import re

import pytest

from mindspeed_args.groups import GROUPS_BY_NAME
from mindspeed_args.schema import DIALECTS, load_schema
from mindspeed_args.values import check_value, same

PARAMS = list(load_schema().params.values())


def test_schema_is_large_and_covers_every_dialect(schema):
    assert len(schema) > 700
    for dialect in DIALECTS:
        assert len(schema.in_dialect(dialect)) > 10, dialect


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: p.name)
def test_parameter_entry_is_complete(p):
    assert re.fullmatch(r"[a-z][a-z0-9_]*", p.name)
    assert p.group in GROUPS_BY_NAME
    assert p.help_en.strip() and p.help_zh.strip()
    for sp in p.spellings.values():
        assert check_value(p.type, sp.default) is None, (sp.dialect, sp.default)
        choices = p.choices_for(sp.dialect)
        if choices and sp.default is not None and p.type in ("str", "int", "float"):
            assert any(same(sp.to_canonical(sp.default), c) for c in choices), (sp.dialect, sp.default, choices)


@pytest.mark.parametrize("p", [p for p in PARAMS if p.range], ids=lambda p: p.name)
def test_defaults_lie_in_range(p):
    low, high = p.range
    for sp in p.spellings.values():
        items = sp.default if isinstance(sp.default, list) else [sp.default]
        for v in items:
            if v is not None:
                assert (low is None or v >= low) and (high is None or v <= high), (sp.dialect, v)


def test_spellings_follow_each_dialect_convention(schema):
    for p in schema.params.values():
        for d, sp in p.spellings.items():
            if d == "megatron":
                assert re.fullmatch(r"--[a-z0-9][a-z0-9_-]*", sp.name), sp.name
            elif d == "swift":
                assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", sp.name), sp.name
            elif d == "fsdp2":
                assert sp.section is not None


def test_find_accepts_every_spelling(schema):
    p = schema["seq_length"]
    for text in ("seq_length", "--seq-length", "DataArguments.cutoff_len", "cutoff_len"):
        assert schema.find(text) is p
    assert schema.find("HCCL_CONNECT_TIMEOUT").name == "hccl_connect_timeout"


def test_dialect_defaults_are_kept_separately(schema):
    p = schema["use_distributed_optimizer"]
    assert p.spellings["megatron"].default is False and p.spellings["swift"].default is True
    assert p.defaults_differ
    assert schema["lr"].default_for("fsdp2") == 1e-5
