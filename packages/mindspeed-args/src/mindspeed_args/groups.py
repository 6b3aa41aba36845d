"""The parameter groups: attribute name on the config object, titles, and the owning package.

The owner is the package that implements (or will implement) the group's features. Which
parameters are implemented *today* is a separate table, :mod:`mindspeed_args.implemented`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    name: str
    title_en: str
    title_zh: str
    owner: str | None  # distribution name; None: no package of this monorepo plans it


_G = Group
GROUPS: tuple[Group, ...] = (
    _G("training", "Training loop", "训练", "mindspeed-train"),
    _G("parallel", "Distributed and parallel layout", "分布式并行", "mindspeed-train"),
    _G("context_parallel", "Context parallel", "上下文并行", "mindspeed-parallel"),
    _G("tp2d", "2D tensor parallel", "2D张量并行", "mindspeed-parallel"),
    _G("ndmm", "N-dimensional matmul", "N维矩阵乘法", "mindspeed-parallel"),
    _G("dualpipe", "DualPipe schedules", "双管道调度", "mindspeed-parallel"),
    _G("memory", "Recompute, swap and offload", "重计算与内存优化", "mindspeed-train"),
    _G("fusion", "Fused operators", "融合算子", "mindspeed-kernels"),
    _G("model", "Model architecture", "模型结构", "mindspeed-models"),
    _G("attention", "Attention", "注意力", "mindspeed-models"),
    _G("moe", "Mixture of experts", "混合专家", "mindspeed-models"),
    _G("mla", "Multi-head latent attention", "多头潜在注意力", "mindspeed-models"),
    _G("mtp", "Multi-token prediction", "多令牌预测", "mindspeed-models"),
    _G("yarn", "YaRN rotary scaling", "YaRN位置编码扩展", "mindspeed-models"),
    _G("alibi", "ALiBi", "ALiBi位置编码", "mindspeed-models"),
    _G("optimizer", "Optimizer", "优化器", "mindspeed-train"),
    _G("lr", "Learning-rate schedule", "学习率", "mindspeed-train"),
    _G("precision", "Mixed precision and FP8", "混合精度", "mindspeed-train"),
    _G("checkpoint", "Checkpointing", "检查点", "mindspeed-train"),
    _G("logging", "Logging", "日志", "mindspeed-train"),
    _G("eval", "Evaluation", "评估", "mindspeed-train"),
    _G("data", "Data and tokenizer", "数据与分词器", "mindspeed-train"),
    _G("lora", "LoRA and tuners", "LoRA微调", "mindspeed-train"),
    _G("rl", "Preference and reinforcement learning", "偏好与强化学习", "mindspeed-rl"),
    _G("inference", "Inference and generation", "推理生成", "mindspeed-rl"),
    _G("profile", "Profiling", "性能分析", "mindspeed-train"),
    _G("fsdp", "FSDP2 sharding", "FSDP2分片", "mindspeed-train"),
    _G("quant", "Quantisation", "量化", "mindspeed-train"),
    _G("export", "Checkpoint export and bridge", "权重导出", "mindspeed-ckpt"),
    _G("multimodal", "Multimodal models", "多模态", None),
    _G("runtime", "Framework and launcher", "框架与启动", "mindspeed-train"),
    _G("env", "Environment variables", "环境变量", "mindspeed-train"),
)
GROUPS_BY_NAME = {g.name: g for g in GROUPS}
