"""mindspeed_args: the schema of every launch parameter of MindSpeed-LLM, MindSpeed-MM and
Megatron-SWIFT, its three dialects (megatron flags, swift flags, FSDP2 YAML), validation rules
and translation between dialects.

    from mindspeed_args import parse_args, validate, load_schema
    cfg = parse_args(["--tensor-model-parallel-size", "2"], dialect="megatron")
    cfg.parallel.tensor_model_parallel_size   # -> 2
"""

from mindspeed_args._version import __version__
from mindspeed_args.config import Config
from mindspeed_args.errors import ArgsError, ConfigError, UsageError
from mindspeed_args.schema import Param, Schema, load_schema
from mindspeed_args.validate import Report, parse_args, validate

__all__ = [
    "ArgsError", "Config", "ConfigError", "Param", "Report", "Schema", "UsageError",
    "__version__", "load_schema", "parse_args", "validate",
]
