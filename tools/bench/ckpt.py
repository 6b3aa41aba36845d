#!/usr/bin/env python
"""Throughput and peak memory of ``mindspeed convert`` against ``cp -r`` of the same files.

Makes a synthetic Hugging Face checkpoint with a real architecture's tensor names and shapes
(TinyLlama-1.1B: Llama, hidden 2048, 32 heads / 4 KV heads, FFN 5632, vocab 32000; layers
added until the bf16 weights reach ``--size-gb``) and random values, written by
``safetensors.torch.save_file`` as 3 shards plus ``model.safetensors.index.json``. Then, in
one run, with the input of each step freshly written (hot in the page cache, as for ``cp``):

1. ``cp -r`` of the HF directory, then ``python -m mindspeed_ckpt.cli hf-to-mcore --tp T
   --pp P`` in a fresh process;
2. ``cp -r`` of the Megatron directory, then ``mcore-to-hf`` back in a fresh process;
3. (untimed, unless ``--no-verify``) the round trip is bit-identical to the input.

Each command's wall time is measured around the child process, so it includes the
interpreter and imports ("startup": the fastest of 3 runs of ``--help``; the column
"ratio w/o startup" subtracts it, for context only). Its peak RSS is the child's VmHWM, read
from /proc/self/status just before it exits. Throughput is the input directory's bytes /
wall time. ``os.sync()`` runs (untimed) before every measurement so that writeback of the
previous step does not land in the next one.

    python tools/bench/ckpt.py                   # >= 2 GiB, TP2 PP2, checks TARGETS
    python tools/bench/ckpt.py --size-gb 0.2     # quick look (targets still printed)
    python tools/bench/ckpt.py --torch-path      # MINDSPEED_CKPT_FAST=0: the torch path, for comparison

The CLI takes its torch-free byte-copy path for both directions here (no dtype cast, no LoRA);
``--torch-path`` measures the torch path in the same conditions. Every row records the 1-minute
load average when its command ran (the machine is shared: ``cp`` itself varies with it).

Exits 1 when a target fails. Disk: about 4x the checkpoint size, under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
MIB = 1024**2
# TinyLlama-1.1B's shapes (https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/config.json)
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 5632,
          "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
TARGETS = {"ratio_vs_cp": 0.5, "rss_fraction": 0.25, "rss_bytes": 1.5 * GIB}


def layer_shapes(i: int, c: dict) -> dict[str, tuple[int, ...]]:
    h, f, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f)}


def plan(size_gb: float, pp: int) -> tuple[dict, list[dict[str, tuple[int, ...]]]]:
    """The config (layers to reach ``size_gb`` in bf16, a multiple of ``pp``) and 3 shards' shapes."""
    c = dict(CONFIG)
    per_layer = 2 * sum(math.prod(s) for s in layer_shapes(0, c).values())
    ends = 2 * (2 * c["vocab_size"] * c["hidden_size"] + c["hidden_size"])
    layers = max(pp, math.ceil(max(size_gb * GIB - ends, 0) / per_layer))
    layers = pp * math.ceil(layers / pp)
    c["num_hidden_layers"] = layers
    shards: list[dict[str, tuple[int, ...]]] = [{}, {}, {}]
    shards[0]["model.embed_tokens.weight"] = (c["vocab_size"], c["hidden_size"])
    for i in range(layers):
        shards[min(2, i * 3 // layers)].update(layer_shapes(i, c))
    shards[2]["model.norm.weight"] = (c["hidden_size"],)
    shards[2]["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
    return c, [s for s in shards if s]


def make_checkpoint(out: Path, size_gb: float, pp: int) -> int:
    """Write the synthetic checkpoint; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file

    c, shards = plan(size_gb, pp)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shapes in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# Runs a module as ``python -m`` would, then prints the process's VmHWM (peak RSS, KiB) as the
# last stderr line. Not ``ru_maxrss`` from wait4: Linux folds the forking parent's high-water
# mark into the child's at exec, so a parent that made a 2 GiB checkpoint would pollute it.
CHILD = """import runpy, sys
mod, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
print("VmHWM_KiB", hwm, file=sys.stderr)
sys.exit(code)
"""


def timed(cmd: list[str], module: str | None = None, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (or ``python -m module cmd...``) in a child process: wall seconds and, for a
    module, the child's peak RSS in bytes."""
    if module is not None:
        cmd = [sys.executable, "-c", CHILD, module, *cmd]
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[-8:])} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    hwm = [ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("VmHWM_KiB")]
    return {"wall_s": wall, "peak_rss": int(hwm[-1]) * 1024 if hwm else math.nan}


def verify(a: Path, b: Path) -> None:
    """Every tensor of HF directory ``b`` equals ``a``'s (same names, dtypes, bits)."""
    import torch
    from safetensors import safe_open

    def names(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {n: d / f for n, f in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return dict.fromkeys(f.keys(), d / "model.safetensors")

    na, nb = names(a), names(b)
    if sorted(na) != sorted(nb):
        raise AssertionError(f"round trip changed the tensor names: {sorted(set(na) ^ set(nb))[:5]}")
    for n in na:
        with safe_open(str(na[n]), "pt") as fa, safe_open(str(nb[n]), "pt") as fb:
            ta, tb = fa.get_tensor(n), fb.get_tensor(n)
            if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                raise AssertionError(f"round trip changed tensor {n!r}")


def run_bench(work: Path, size_gb: float, tp: int, pp: int, check: bool, torch_path: bool = False) -> list[dict]:
    hf, mc, back = work / "hf", work / "mcore", work / "hf_back"
    ckpt_bytes = make_checkpoint(hf, size_gb, pp)
    startup = min((timed(["--help"], module="mindspeed_ckpt.cli") for _ in range(3)), key=lambda m: m["wall_s"])
    rows = []
    steps = (("hf-to-mcore", hf, mc, ["hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc), "--tp", str(tp), "--pp", str(pp)]),
             ("mcore-to-hf", mc, back, ["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back)]))
    for label, src, _, args in steps:
        cp = timed(["cp", "-r", str(src), str(work / "cp_copy")])
        shutil.rmtree(work / "cp_copy")
        load = os.getloadavg()[0]
        ours = timed(args, module="mindspeed_ckpt.cli", env={"MINDSPEED_CKPT_FAST": "0" if torch_path else "1"})
        n = dir_bytes(src)
        name = f"{label} (TP{tp} PP{pp}){' torch path' if torch_path else ''}"
        rows.append({"direction": name, "load_avg_1m": load, "input_bytes": n, "ours_s": ours["wall_s"], "cp_s": cp["wall_s"],
                     "ours_Bps": n / ours["wall_s"], "cp_Bps": n / cp["wall_s"], "ratio": cp["wall_s"] / ours["wall_s"],
                     "peak_rss": ours["peak_rss"], "rss_fraction": ours["peak_rss"] / ckpt_bytes,
                     "startup_s": startup["wall_s"], "startup_rss": startup["peak_rss"], "ckpt_bytes": ckpt_bytes})
    if check:
        verify(hf, back)
    return rows


def verdicts(row: dict) -> dict[str, bool]:
    return {"ratio": row["ratio"] >= TARGETS["ratio_vs_cp"],
            "rss": row["rss_fraction"] < TARGETS["rss_fraction"] and row["peak_rss"] < TARGETS["rss_bytes"]}


def print_table(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"checkpoint: {r0['ckpt_bytes'] / GIB:.2f} GiB bf16; startup (python + import): {r0['startup_s']:.2f} s, "
          f"{r0['startup_rss'] / MIB:.0f} MiB RSS; load average {os.getloadavg()[0]:.2f}")
    head = ("direction", "MB/s ours", "MB/s cp", "ratio", "ratio w/o startup", "peak RSS MB", "% of ckpt", "ratio>=0.5",
            "RSS<25%&<1.5GB", "load 1m")
    lines = [head]
    for r in rows:
        v = verdicts(r)
        bare = r["cp_s"] / max(r["ours_s"] - r["startup_s"], 1e-9)  # context only: the target counts the whole command
        lines.append((r["direction"], f"{r['ours_Bps'] / 1e6:.0f}", f"{r['cp_Bps'] / 1e6:.0f}", f"{r['ratio']:.2f}",
                      f"{bare:.2f}", f"{r['peak_rss'] / 1e6:.0f}", f"{100 * r['rss_fraction']:.1f}",
                      "PASS" if v["ratio"] else "FAIL", "PASS" if v["rss"] else "FAIL", f"{r['load_avg_1m']:.2f}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GiB, at least (default 2)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--workdir", help="where to put the checkpoints (default: a temporary directory, removed)")
    ap.add_argument("--no-verify", action="store_true", help="skip the bit-identical round-trip check")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--torch-path", action="store_true", help="measure the torch path (MINDSPEED_CKPT_FAST=0) instead")
    a = ap.parse_args(argv)
    if a.size_gb <= 0:
        ap.error(f"--size-gb must be positive; got {a.size_gb}")
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=a.workdir))
    try:
        rows = run_bench(work, a.size_gb, a.tp, a.pp, check=not a.no_verify, torch_path=a.torch_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(all(verdicts(r).values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
