"""Peak resident memory of a conversion is bounded by its largest tensor, not by the model.

A ~150 MB Llama checkpoint (fp32, 8 layers, hidden 512, vocab 8192: the largest tensors are
the 16 MiB embedding and output matrices; a TP2 PP2 rank file is ~40 MB) is converted to
TP2 PP2 and back, each in a fresh process that reports its VmHWM. The baseline is the same
process running ``--help`` (interpreter, torch and our modules imported). The bound,
``peak - baseline <= 2 * largest tensor + 24 MiB``:

- hf-to-mcore holds one full megatron tensor (read with ``pread``) and at most one shard
  copy of it (dim-1 splits); rank files are streamed (``RankWriter``), never held whole;
- mcore-to-hf holds one merged tensor plus the mapped pages of its TP shards (dropped
  right after the merge) or the HF tensors cut from it (as large as the merged one); HF
  shards are streamed (planned ``HFWriter``);
- 24 MiB covers the pickles, the heap and Python objects.

That is well below the largest output file plus a few tensors, and far below the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")]

MIB = 2**20
SLACK = 24 * MIB
CONFIG = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
          "num_key_value_heads": 2, "num_hidden_layers": 8, "vocab_size": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": "float32"}

CHILD = """import runpy, sys
sys.argv = ["mindspeed_ckpt.cli", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("mindspeed_ckpt.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
print("VmHWM_KiB", [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1], file=sys.stderr)
sys.exit(code)
"""


def _shapes() -> dict[str, tuple[int, ...]]:
    h, f, v, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], 2 * 64
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, h),
                    p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def _make(hf: Path) -> tuple[int, int]:
    """Write the checkpoint in two shards; returns (total bytes, largest tensor bytes)."""
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(CONFIG))
    names = list(_shapes().items())
    g = torch.Generator().manual_seed(0)
    weight_map, total, largest = {}, 0, 0
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in part}
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(tensors, str(hf / file))
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
        largest = max([largest, *(t.nbytes for t in tensors.values())])
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total, largest


def _peak(*args: str) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int([ln for ln in proc.stderr.splitlines() if ln.startswith("VmHWM_KiB")][-1].split()[1]) * 1024


def test_conversion_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    total, largest = _make(tmp_path / "hf")
    assert total > 100 * MIB
    base = _peak("--help")
    to_mcore = _peak("hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "mc"), "--tp", "2", "--pp", "2")
    back = _peak("mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back"))
    files = [p.stat().st_size for p in (tmp_path / "mc").rglob("*.pt")]
    assert len(files) == 4 and max(files) > 30 * MIB
    bound = 2 * largest + SLACK
    for label, peak in (("hf-to-mcore", to_mcore), ("mcore-to-hf", back)):
        over = peak - base
        assert over <= bound, (f"{label}: peak {peak / MIB:.0f} MiB is {over / MIB:.0f} MiB over the {base / MIB:.0f} MiB "
                               f"baseline; bound {bound / MIB:.0f} MiB (largest tensor {largest / MIB:.0f} MiB, "
                               f"largest rank file {max(files) / MIB:.0f} MiB, model {total / MIB:.0f} MiB)")
    # and the round trip is exact
    from safetensors import safe_open
    idx = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "back" / "model.safetensors.index.json").exists() else None
    for name in _shapes():
        src = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"][name]
        dst = idx[name] if idx else "model.safetensors"
        with safe_open(str(tmp_path / "hf" / src), "pt") as a, safe_open(str(tmp_path / "back" / dst), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
