#!/usr/bin/env python
"""Training throughput of the `mindspeed train` loop against a plain Hugging Face model with torch AdamW.

One process, world size 1. Both sides train the same tiny model (a Hugging Face ``config.json``,
llama by default) from the same initial weights, on the same batches, with the same optimizer
settings, for the same number of steps, in the same run:

- **ours**: the real loop in-process: ``mindspeed_train.launch.build_config(argv)`` on the flags a
  ``mindspeed train`` launch would get, then ``loop.init_parallel`` / ``loop.build_job`` /
  ``loop.train_step`` (megatron-core GPTModel with mindspeed-kernels inside, megatron DDP with
  gradient-accumulation fusion, megatron's optimizer wrapper around torch's fused AdamW, the LR
  scheduler, gradient clipping);
- **hf**: ``AutoModelForCausalLM.from_config`` (same config, ``attn_implementation="sdpa"``),
  ``torch.optim.AdamW`` with megatron's weight-decay grouping (none on biases and 1-D parameters),
  ``clip_grad_norm_``, token-mean cross-entropy over the same (already shifted) labels. Its AdamW
  runs torch's default implementation (a per-tensor loop on CPU, foreach on CUDA);
  ``--hf-fused-adamw`` gives it the fused kernel ours uses, to separate the optimizer from the rest.
  Its linear layers run torch's GEMM (MKL's sgemm for CPU float32), ours run mindspeed-kernels'
  (oneDNN for CPU float32 GEMMs, see ``mindspeed_kernels.backends.reference.gemm``);
  ``--hf-kernel-linear`` gives it that GEMM too. The report names each side's AdamW and GEMM.

Loss trajectories: float32 rounding differs between the sides (oneDNN's GEMMs against MKL's; fused QKV
and gate|up GEMMs and the accumulation into megatron's gradient buffer sum in another order), and AdamW
makes such differences grow over the steps. At the default sizes the sides stay within ~2e-5 over 26
steps; at hidden 512 / seq 512 they pass 1e-3 around step 19, as far as ours with oneDNN is from ours
with ``MINDSPEED_CPU_GEMM=torch`` there (1.2e-3): pass ``--loss-tol 2e-3`` at that size.

Initial weights: the HF model's, copied into ours with ``mindspeed_ckpt.maps.hf_to_mcore``, so step
1 losses agree to float rounding and the loss trajectories can be compared step by step.
Batches: megatron's GPTDataset (``mindspeed_train.data.gpt``) over a learnable synthetic corpus,
built once before timing and fed to both sides (so data loading is not timed for either).

Timing: the sides run interleaved, ``--chunk`` steps each in turn, so a noisy neighbour on a shared
machine hits both; the first ``--warmup`` steps of each side are not timed. Tokens/s of a side is
global batch x seq / the median (and / the best) of its timed step times (``time.perf_counter``
between device synchronisations). Ratio = ours / hf (> 1: ours is faster). The median CPU time of
the process per step is printed too: with ``--threads 1`` on a shared CPU it is the steadiest of the
three (waiting for a core does not count). So is the median number of minor page faults per step: on
CPU, glibc hands freed activation memory back to the OS and the next step faults it in again, which
costs each side kernel time according to its own allocation pattern (the two sides share one process
and one allocator). No timed assertion: the script prints.

    python tools/bench/train.py                          # llama, hidden 256, 4 layers, seq 256, micro 4
    python tools/bench/train.py --threads 1 --steps 24    # on a shared CPU: the steadiest numbers
    python tools/bench/train.py --model-type qwen2 --kv-heads 2
    python tools/bench/train.py --quick --json out.json  # tiny sizes (smoke test)
    python tools/bench/train.py --device cuda --hidden 1024 --ffn 2816 --layers 8 --heads 16 --kv-heads 16 \
        --vocab 32768 --seq 1024 --micro 8 --steps 20

Exits 1 when a side fails or the loss trajectories disagree by more than ``--loss-tol``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import resource  # Unix only: the page-fault counts read 0 elsewhere
except ImportError:
    resource = None

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

FULL = {"hidden": 256, "ffn": 688, "layers": 4, "heads": 4, "kv_heads": 4, "vocab": 2048, "seq": 256, "micro": 4,
        "steps": 12, "warmup": 2, "chunk": 3}  # fmt: skip
QUICK = {"hidden": 32, "ffn": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 256, "seq": 32, "micro": 2,
         "steps": 2, "warmup": 1, "chunk": 1}  # fmt: skip
MODEL_TYPES = ("llama", "qwen2")
EOS = 0


def write_model(root: Path, model_type: str, s: dict) -> Path:
    """A fp32 HF config (untied embeddings, no dropout) in ``root/model``; returns the directory."""
    path = root / "model"
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": model_type, "vocab_size": s["vocab"], "hidden_size": s["hidden"],
              "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "num_key_value_heads": s["kv_heads"], "max_position_embeddings": max(s["seq"], 64),
              "rms_norm_eps": 1e-6, "eos_token_id": EOS, "bos_token_id": EOS, "tie_word_embeddings": False,
              "attention_dropout": 0.0, "rope_theta": 10000.0, "torch_dtype": "float32"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def write_corpus(root: Path, vocab: int, tokens: int, seed: int = 0) -> str:
    """Counting documents (next token = previous + a per-document stride, wrapping in 1..vocab-1),
    each ended by EOS: learnable, so the loss falls. At least ``tokens`` tokens; returns the prefix."""
    from mindspeed_train.data.writer import IndexedWriter

    (root / "data").mkdir(parents=True, exist_ok=True)
    prefix = str(root / "data" / "corpus_text_document")
    rng, written = np.random.default_rng(seed), 0
    with IndexedWriter({"text": prefix}) as writer:
        while written < tokens:
            start, stride, length = (int(x) for x in (rng.integers(1, vocab), rng.integers(1, 4), rng.integers(32, 512)))
            doc = (start + stride * np.arange(length) - 1) % (vocab - 1) + 1
            writer.add("text", [*doc.tolist(), EOS])
            written += length + 1
    return prefix


def launch_flags(model: Path, prefix: str, s: dict, a: argparse.Namespace, iters: int) -> list[str]:
    """The megatron-dialect flags of the equivalent `mindspeed train` launch (constant LR)."""
    return ["--model", str(model), "--data-path", prefix, "--split", "100,0,0",
            "--micro-batch-size", str(s["micro"]), "--global-batch-size", str(s["micro"] * a.accum),
            "--seq-length", str(s["seq"]), "--train-iters", str(iters), "--lr", str(a.lr), "--min-lr", str(a.lr),
            "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--weight-decay", str(a.weight_decay),
            "--adam-beta1", str(a.betas[0]), "--adam-beta2", str(a.betas[1]), "--adam-eps", str(a.eps),
            "--clip-grad", str(a.clip_grad), "--seed", str(a.seed), "--log-interval", "1",
            # no padded vocabulary rows: they would join ours' softmax and part the loss trajectories
            "--make-vocab-size-divisible-by", "1", *shlex.split(a.train_args)]  # fmt: skip


def _init_process_group() -> None:
    from mindspeed_kernels import accelerator

    if not dist.is_initialized():
        dist.init_process_group(backend=accelerator.collective_backend(), store=dist.HashStore(), rank=0, world_size=1)


def build_ours(argv: list[str]):
    """(Job, TrainConfig) of the real loop for ``argv``, parallel state and RNGs set up as `mindspeed train` does."""
    from mindspeed_train import launch, loop

    config = launch.build_config(argv)
    _init_process_group()
    loop.init_parallel(config)
    return loop.build_job(config), config


def make_batches(config, job, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` microbatches the loop's data pipeline yields for this config."""
    from mindspeed_train.data.gpt import build_datasets, make_loader

    b = config.batch
    train, _ = build_datasets(config.data_path, split=config.split, seq_length=b.seq_length, seed=config.seed,
                              num_samples=count * b.micro, valid_samples=0, eod=EOS, vocab_size=job.spec.vocab_size)  # fmt: skip
    loader = make_loader(train, consumed=0, micro=b.micro, dp_rank=0, dp_size=1)
    return [{k: v.to(device) for k, v in next(loader).items()} for _ in range(count)]


def build_hf(model_dir: Path, job, a: argparse.Namespace, device: torch.device):
    """(HF model, AdamW) with the HF model's initial weights copied into ours (``job.model``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mindspeed_ckpt.maps import hf_to_mcore
    from mindspeed_models.pretrained import load_state

    torch.manual_seed(a.seed)
    hf_config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    model.train()
    if a.hf_kernel_linear:
        route_linears(model)
    tensors = {name: t.detach() for name, t in model.state_dict().items()}
    state = hf_to_mcore(dict(job.spec.hf_config), tensors, padded_vocab_size=job.spec.padded_vocab_size)
    with torch.no_grad():
        load_state(job.model.module, state)  # copies into DDP's parameter buffers in place
    # megatron's grouping: no weight decay on biases and 1-D parameters (norm weights).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if a.hf_fused_adamw else {}
    optimizer = torch.optim.AdamW(groups, lr=a.lr, betas=tuple(a.betas), eps=a.eps, **fused)
    return model, optimizer


def _kernel_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    from mindspeed_kernels.ops import linear

    return linear(x, module.weight, module.bias)


def route_linears(model: torch.nn.Module) -> None:
    """``--hf-kernel-linear``: every ``nn.Linear`` of the baseline computes through
    ``mindspeed_kernels.ops.linear``, the GEMM ours runs (oneDNN for CPU float32)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = functools.partial(_kernel_linear_forward, module)


def gemm_kind(device: torch.device, kernels: bool) -> str:
    """The GEMM a side's linear layers run: "oneDNN" (the kernels' CPU path), or torch's own."""
    from mindspeed_kernels.backends.reference import gemm

    return "oneDNN" if kernels and device.type == "cpu" and gemm.cpu_gemm() == "onednn" else "torch"


def adamw_kind(groups: list[dict], device: torch.device) -> str:
    """Which AdamW implementation torch runs for these param groups ("fused", "foreach", "for-loop")."""
    if all(g.get("fused") for g in groups):
        return "fused"
    foreach = [g.get("foreach") for g in groups]
    if all(f is None for f in foreach):  # torch's default: foreach on CUDA tensors only
        return "foreach" if device.type == "cuda" else "for-loop"
    return "foreach" if all(foreach) else "for-loop"


def hf_step(model, optimizer, batches: list[dict], clip_grad: float) -> float:
    """One optimizer step over ``batches`` (the global batch's microbatches); returns the mean loss."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=batches[0]["tokens"].device)
    for batch in batches:
        logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
        per_token = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        mask = batch["loss_mask"].flatten().float()
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        (loss / len(batches)).backward()
        total += loss.detach()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return float(total) / len(batches)  # one host sync per step, as ours has


def one_step(side: str, job, hf_model, hf_opt, group: list[dict], clip_grad: float) -> float:
    """One optimizer step of ``side`` ("ours" or "hf") over the microbatches ``group``; returns its loss."""
    from mindspeed_train import loop

    if side == "ours":
        return loop.train_step(job, iter(group))[0]
    return hf_step(hf_model, hf_opt, group, clip_grad)


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where the platform has no getrusage): memory the
    allocator gave back to the OS and then touched again, which a step pays for in kernel time."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_sides(job, hf_model, hf_opt, batches: list[dict], a: argparse.Namespace, s: dict) -> dict:
    """Interleave ``chunk`` steps of each side (alternating which goes first) until both ran
    ``warmup + steps``; per-step seconds and losses of each side."""
    from mindspeed_kernels import accelerator

    accum, total = a.accum, s["warmup"] + s["steps"]
    out = {side: {"times_s": [], "cpu_s": [], "faults": [], "losses": []} for side in ("ours", "hf")}
    for first in range(0, total, s["chunk"]):
        for side in ("ours", "hf") if (first // s["chunk"]) % 2 == 0 else ("hf", "ours"):
            for i in range(first, min(first + s["chunk"], total)):
                accelerator.synchronize()
                faults_start = _minor_faults()  # read before the clocks start: not part of the step
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = one_step(side, job, hf_model, hf_opt, batches[i * accum:(i + 1) * accum], a.clip_grad)
                accelerator.synchronize()
                out[side]["times_s"].append(time.perf_counter() - start)
                out[side]["cpu_s"].append(time.process_time() - cpu_start)
                out[side]["faults"].append(_minor_faults() - faults_start)
                out[side]["losses"].append(loss)
    return out


def print_profiles(job, hf_model, hf_opt, batches: list[dict], a: argparse.Namespace, device: torch.device) -> None:
    """torch.profiler over one more step of each side (the first global batch again): the top
    ``--profile`` ops by self time, to see where the difference goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for side in ("ours", "hf"):
        with profile(activities=activities) as prof:
            one_step(side, job, hf_model, hf_opt, batches[:a.accum], a.clip_grad)
        print(f"profile of one {side} step, top {a.profile} ops by {sort}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=a.profile))


def summarise(out: dict, s: dict, a: argparse.Namespace) -> dict:
    """Per side: median and best timed step, tokens/s of each; the ratios ours / hf; the loss gap."""
    tokens = s["micro"] * a.accum * s["seq"]
    row = {"tokens_per_step": tokens, "warmup": s["warmup"], "timed_steps": s["steps"]}
    for side in ("ours", "hf"):
        timed = {key: out[side][key][s["warmup"]:] for key in ("times_s", "cpu_s", "faults")}
        median, best = statistics.median(timed["times_s"]), min(timed["times_s"])
        row[side] = {**out[side], "median_s": median, "best_s": best, "tokens_per_s": tokens / median,
                     "tokens_per_s_best": tokens / best, "median_cpu_s": statistics.median(timed["cpu_s"]),
                     "median_faults": statistics.median(timed["faults"])}  # fmt: skip
    row["ratio"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    row["ratio_best"] = row["ours"]["tokens_per_s_best"] / row["hf"]["tokens_per_s_best"]
    # CPU seconds of this process: with --threads 1 on CPU, what a step costs whatever the neighbours do.
    row["ratio_cpu"] = row["hf"]["median_cpu_s"] / row["ours"]["median_cpu_s"]
    diffs = [abs(x - y) for x, y in zip(out["ours"]["losses"], out["hf"]["losses"], strict=True)]
    row["loss_max_abs_diff"] = max(diffs)
    return row


def print_report(row: dict, s: dict, a: argparse.Namespace, device: str) -> None:
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {a.model_type} hidden "
          f"{s['hidden']} ffn {s['ffn']} layers {s['layers']} heads {s['heads']}/{s['kv_heads']} vocab {s['vocab']}, "
          f"seq {s['seq']} x micro {s['micro']} x accum {a.accum} = {row['tokens_per_step']} tokens/step, "
          f"{s['warmup']} warm-up + {s['steps']} timed steps per side, interleaved by {s['chunk']}; "
          f"AdamW: ours {row['adamw']['ours']}, hf {row['adamw']['hf']}; "
          f"GEMM: ours {row['gemm']['ours']}, hf {row['gemm']['hf']}; load average {os.getloadavg()[0]:.2f}")
    head = ("side", "tokens/s (median)", "tokens/s (best)", "median step s", "best step s", "median CPU s",
            "page faults/step", "loss first", "loss last")
    lines = [head]
    for side in ("ours", "hf"):
        r = row[side]
        lines.append((side, f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s_best']:.0f}", f"{r['median_s']:.4f}",
                      f"{r['best_s']:.4f}", f"{r['median_cpu_s']:.4f}", f"{r['median_faults']:.0f}", f"{r['losses'][0]:.5f}",
                      f"{r['losses'][-1]:.5f}"))  # fmt: skip
    lines.append(("ratio ours/hf", f"{row['ratio']:.3f}", f"{row['ratio_best']:.3f}", "", "", f"{row['ratio_cpu']:.3f}", "", "",
                  ""))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    print(f"loss trajectories: max |ours - hf| over {len(row['ours']['losses'])} steps = {row['loss_max_abs_diff']:.2e}")
    print("  ours: " + " ".join(f"{x:.4f}" for x in row["ours"]["losses"]))
    print("  hf:   " + " ".join(f"{x:.4f}" for x in row["hf"]["losses"]))


def _sizes(a: argparse.Namespace) -> dict:
    s = dict(QUICK if a.quick else FULL)
    for key in s:
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    for key, value in s.items():
        if value < (0 if key == "warmup" else 1):
            raise SystemExit(f"--{key.replace('_', '-')} {value}: must be >= {0 if key == 'warmup' else 1}")
    if s["hidden"] % s["heads"] or s["heads"] % s["kv_heads"]:
        raise SystemExit(f"--hidden {s['hidden']} / --heads {s['heads']} / --kv-heads {s['kv_heads']}: "
                         "hidden must divide by heads and heads by kv-heads")  # fmt: skip
    return s


def _check_device(requested: str) -> torch.device:
    from mindspeed_kernels import accelerator

    found = accelerator.device_type()
    if requested != found:
        hint = "run with CUDA_VISIBLE_DEVICES= to force the CPU" if requested == "cpu" else "run on a machine that has one"
        raise SystemExit(f"--device {requested}: this process computes on {found!r} (mindspeed_kernels.accelerator); {hint}")
    return accelerator.current_device()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", choices=MODEL_TYPES, default="llama")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 1 warm-up + 2 timed steps (smoke test)")
    for key in FULL:
        help_text = f"default {FULL[key]} ({QUICK[key]} with --quick)"
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=help_text)
    ap.add_argument("--accum", type=int, default=1, help="microbatches per step (gradient accumulation; default 1)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95])
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip-grad", type=float, default=1.0, help="0: no clipping")
    ap.add_argument("--hf-fused-adamw", action="store_true",
                    help="give the hf side torch's fused AdamW too (default: torch's default implementation)")
    ap.add_argument("--hf-kernel-linear", action="store_true",
                    help="give the hf side's nn.Linear layers the GEMM ours runs (mindspeed_kernels.ops.linear: "
                         "oneDNN for CPU float32; default: torch's)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both sides (default: torch's)")
    ap.add_argument("--device", choices=("cpu", "cuda", "npu"), default="cpu")
    ap.add_argument("--loss-tol", type=float, default=None,
                    help="largest accepted per-step |ours - hf| loss difference (default 1e-3 on CPU, 5e-2 on accelerators)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one more step per side and print its top N ops (default 0: off)")
    ap.add_argument("--train-args", default="", metavar="FLAGS",
                    help="extra `mindspeed train` flags for ours, e.g. '--cross-entropy-loss-fusion' (one string)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = ap.parse_args(argv)
    if a.accum < 1:
        ap.error(f"--accum {a.accum}: must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    s = _sizes(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = _check_device(a.device)
    tol = a.loss_tol if a.loss_tol is not None else (1e-3 if device.type == "cpu" else 5e-2)
    steps = s["warmup"] + s["steps"]
    try:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            root = Path(tmp)
            model_dir = write_model(root, a.model_type, s)
            prefix = write_corpus(root, s["vocab"], tokens=2 * steps * a.accum * s["micro"] * s["seq"])
            job, config = build_ours(launch_flags(model_dir, prefix, s, a, steps))
            batches = make_batches(config, job, steps * a.accum, device)
            hf_model, hf_opt = build_hf(model_dir, job, a, device)
            row = summarise(run_sides(job, hf_model, hf_opt, batches, a, s), s, a)
            from mindspeed_train.optim import inner_optimizers

            ours_groups = [g for inner in inner_optimizers(job.optimizer) for g in inner.param_groups]
            row.update(sizes=s, model_type=a.model_type, device=str(device), threads=torch.get_num_threads(), loss_tol=tol,
                       adamw={"ours": adamw_kind(ours_groups, device), "hf": adamw_kind(hf_opt.param_groups, device)},
                       gemm={"ours": gemm_kind(device, True), "hf": gemm_kind(device, a.hf_kernel_linear)})
            print_report(row, s, a, str(device))
            if a.profile:
                print_profiles(job, hf_model, hf_opt, batches, a, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ok = row["loss_max_abs_diff"] <= tol
    print(f"loss trajectories {'agree' if ok else 'DIFFER'} within {tol:.1e} (ratio > 1: ours is faster)")
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0 if ok and math.isfinite(row["ratio"]) else 1


if __name__ == "__main__":
    sys.exit(main())
