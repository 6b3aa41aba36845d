"""Human-readable descriptions of parameters (``args show`` / ``args list``) and of reports."""

from __future__ import annotations

from mindspeed_args.groups import GROUPS_BY_NAME
from mindspeed_args.implemented import implementer
from mindspeed_args.rules import RULES
from mindspeed_args.schema import DIALECTS, Param
from mindspeed_args.validate import Report
from mindspeed_args.values import to_text

SOURCE_NAMES = {"000": "MindSpeed-LLM guide", "001": "MindSpeed-LLM FSDP2 guide", "002": "MindSpeed-MM guide",
                "003": "Megatron-SWIFT guide", "megatron-core": "Megatron-LM/megatron-core"}


def show(p: Param) -> str:
    g = GROUPS_BY_NAME[p.group]
    impl = implementer(p.name)
    lines = [
        f"{p.name}  ({p.type}, group {p.group}: {g.title_en})",
        f"  {p.help_en}",
        f"  {p.help_zh}",
        f"  implemented: {impl or 'not yet'}" + ("" if impl else f" (owner: {p.owner or 'none planned'})"),
    ]
    if p.choices:
        lines.append("  choices: " + ", ".join(to_text(c) for c in p.choices))
    if p.range:
        lines.append(f"  range: [{to_text(p.range[0])}, {to_text(p.range[1])}]")
    lines.append("  spellings:")
    for d in DIALECTS:
        sp = p.spellings.get(d)
        if sp is None:
            via = "  (via --megatron_extra_kwargs)" if d == "swift" and "megatron" in p.spellings else ""
            if via:
                lines.append(f"    {d:9s} --megatron_extra_kwargs '{{\"{p.name}\": ...}}'  default {to_text(p.default_for(d))}")
            continue
        per_source = ", ".join(f"{SOURCE_NAMES[s]}: {to_text(v)}" for s, v in sp.source_defaults.items())
        lines.append(f"    {d:9s} {sp.display:44s} default {to_text(sp.default)}"
                     + (f"   [{per_source}]" if len(sp.source_defaults) > 1 else "")
                     + ("  (required)" if sp.required else ""))
    if p.defaults_differ:
        lines.append("  note: the dialects' defaults differ; each launch keeps its own dialect's default")
    lines += [f"  note: {n}" for n in p.notes]
    rules = [r.id for r in RULES if p.name in r.reads]
    if rules:
        lines.append("  rules: " + ", ".join(rules))
    lines.append("  sources: " + ", ".join(SOURCE_NAMES[s] for s in p.sources))
    return "\n".join(lines)


def list_line(p: Param, dialect: str | None) -> str:
    sp = p.spellings.get(dialect) if dialect else None
    spelling = sp.display if sp else ", ".join(s.display for s in p.spellings.values())
    return f"{p.name:48s} {p.type:10s} {to_text(p.default_for(dialect or 'megatron')):16s} {spelling}"


def report(r: Report) -> str:
    res = r.resolved
    lines = [f"{res.dialect} dialect: {len(res.explicit)} parameters set"]
    if r.notices:
        lines.append(f"derived ({len(r.notices)}):")
        lines += [f"  {n.one_line()}" for n in r.notices]
    rules = [v for v in r.violations if v.rule != "not-implemented"]
    missing = [v for v in r.violations if v.rule == "not-implemented"]
    if rules:
        lines.append(f"violations ({len(rules)}):")
        lines += [f"  {v.one_line()}" for v in rules]
    if missing:
        lines.append(f"not implemented yet ({len(missing)}): set to non-default values that no installed "
                     "feature implements:")
        lines += [f"  [not-implemented] {v.constraint}; fix: {v.fix}" for v in missing]
    lines.append("ok: no violations" if r.ok else f"FAILED: {len(r.violations)} violation(s)")
    return "\n".join(lines)
