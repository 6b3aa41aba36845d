"""tools/gen_models_docs.py: the page covers the whole registry, seed statuses follow it, and it stays megatron-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOOLS))

import gen_models_docs as gen  # noqa: E402
from models_seed_params import IMPLEMENTED, NA, NOT_YET, SEED_PARAMS, SeedParam  # noqa: E402

from mindspeed_models import architectures  # noqa: E402


def test_every_architecture_and_key_is_documented():
    text = gen.render()
    for arch in architectures.ARCHITECTURES.values():
        assert f"| `{arch.model_type}` | `{arch.hf_class}` |" in text
        section = text.split(f"### `{arch.model_type}` ({arch.hf_class})\n", 1)[1].split("###", 1)[0]
        for key in arch.keys:
            assert f"| `{key.name}` | `{key.target}` |" in section, f"{arch.model_type}.{key.name} missing"


def test_status_follows_the_registry():
    arch = next(iter(architectures.ARCHITECTURES.values()))
    mapped = next(k.name for k in arch.keys if k.target != "-")
    assert gen.status(SeedParam("x", "s", "h", (mapped,))) == IMPLEMENTED
    assert arch.model_type in gen.providers(SeedParam("x", "s", "h", (mapped,)))
    assert gen.status(SeedParam("x", "s", "h", ("no_such_hf_key",))) == NOT_YET
    assert gen.status(SeedParam("x", "s", "h", status=NA)) == NA
    qk = SeedParam("qk-layernorm", "s", "h", arch_attr="qk_norm")
    assert set(gen.providers(qk)) == {a.model_type for a in architectures.ARCHITECTURES.values() if a.qk_norm}


def test_seed_table_is_well_formed():
    flags = [p.flag for p in SEED_PARAMS]
    assert len(flags) == len(set(flags)), "duplicate flag"
    for p in SEED_PARAMS:
        assert p.status in ("", IMPLEMENTED, NOT_YET, NA), p.flag
        assert bool(p.status) != bool(p.hf_keys or p.arch_attr), f"{p.flag}: give hf_keys/arch_attr or a fixed status"
        assert p.source == "megatron-core" or p.source.startswith("seed-000 §"), p.flag
    text = gen.render()
    assert all(f"`--{flag}`" in text for flag in flags)


def test_generator_does_not_import_megatron():
    code = f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import gen_models_docs as g; g.render(); " \
           "assert not any(m.startswith(('megatron', 'torch')) for m in sys.modules), 'heavy import'"  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
