#!/usr/bin/env bash
# A tour of the parameter tools (mindspeed-cli, mindspeed-args): inspect, validate and translate
# real MindSpeed-LLM / FSDP2 / Megatron-SWIFT launches. Needs only those two packages:
#   pip install packages/mindspeed-cli packages/mindspeed-args && bash examples/args_tour.sh
# Exit status 1 from `validate` means "violations found" and is part of the show.
set -euo pipefail
cd "$(dirname "$0")"
step() { printf '\n=== %s\n$ %s\n' "$1" "${*:2}"; }
expect() { local want=$1; shift; set +e; "$@"; local got=$?; set -e
  [ "$got" = "$want" ] || { echo "demo: expected exit $want from: $*, got $got" >&2; exit 1; }; }

step "installed packages" mindspeed --version; mindspeed --version
step "the machine" mindspeed env; mindspeed env
step "one parameter, every dialect" mindspeed args show --context-parallel-algo
mindspeed args show --context-parallel-algo
step "a real MindSpeed-LLM launch on 16 devices (features land in later releases)" \
     mindspeed args validate -- "\$(flags of launch/qwen3_8b_pretrain.sh)"
mapfile -t FLAGS < <(python -c "import sys; from mindspeed_args.dialects.flags import read_flags_file as r; print('\n'.join(r(sys.argv[1])))" launch/qwen3_8b_pretrain.sh)
WORLD_SIZE=16 expect 1 mindspeed args validate --dialect megatron -- "${FLAGS[@]}"
step "a broken launch: every violation at once" mindspeed args validate -- --context-parallel-size 4 ...
expect 1 mindspeed args validate --dialect megatron -- --context-parallel-size 4 --context-parallel-algo megatron_cp_algo \
    --seq-length 100 --num-attention-heads 8 --use-mcore-models --cp-window-size 4 --recompute-method block
step "a typo is unusable input (exit 2)" mindspeed args validate -- --tensor-model-paralel-size 2
expect 2 mindspeed args validate -- --tensor-model-paralel-size 2
OUT=$(mktemp -d)
step "FSDP2 YAML -> Megatron flags (8 devices)" mindspeed args convert --from fsdp2 --to megatron --world-size 8 fsdp2/qwen3_sft.yaml
mindspeed args convert --from fsdp2 --to megatron --world-size 8 fsdp2/qwen3_sft.yaml | tee "$OUT/megatron.sh"
step "Megatron flags -> Megatron-SWIFT" mindspeed args convert --from megatron --to swift "$OUT/megatron.sh"
mindspeed args convert --from megatron --to swift "$OUT/megatron.sh" | tee "$OUT/swift.sh"
step "Megatron-SWIFT -> FSDP2 YAML again" mindspeed args convert --from swift --to fsdp2 --world-size 8 "$OUT/swift.sh"
mindspeed args convert --from swift --to fsdp2 --world-size 8 "$OUT/swift.sh"
printf '\ndemo finished: translations are in %s\n' "$OUT"
