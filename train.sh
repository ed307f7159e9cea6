#!/usr/bin/env sh
# UNet pretraining. Usage:
#   sh train.sh                              the embedded default (demo data, tiny init, CPU, a few minutes)
#   sh train.sh [LAUNCH FLAGS] [TRAIN FLAGS] your own run; TRAIN FLAGS are train.py's (see README)
#
# LAUNCH FLAGS, first on the line (any of them runs through `python -m paddle.distributed.launch`):
#   --gpus 0,1,2,3         one process per listed GPU (as the reference; NCCL)
#   --nproc_per_node N     N processes (on a CPU: gloo, for tests and debugging; on GPUs: the first N)
#   --ips IP1,IP2          several nodes, as the reference (run the same command on every node)
#   --master IP:PORT --nnodes N [--rank R]   several nodes through a master address (same command everywhere)
#   --host IP              this node's address when the hostname does not resolve to the one in --ips
#   --log_dir DIR --job_id NAME --start_port P --devices ...   passed to the launcher as they are
# scripts/preflight.py checks devices, nodes, data shards, /dev/shm and output_dir first; inside the job every
# rank checks that output_dir is shared and watches the others (a dead rank ends the job within SD_RANK_TIMEOUT
# seconds, default 30). Worker logs: log/workerlog.N (or --log_dir).
#
# The reference's environment switches (FLAG_USE_EMA, FLAG_RECOMPUTE, FLAG_XFORMERS, FLAG_FUSED_LINEAR,
# FLAG_BENCHMARK, FLAG_TO_STATIC) pass through to train.py, which reads them (sd/args.py parse_train) whatever
# launched it; an explicit flag on the command line wins. FLAGS_* variables of Paddle itself (e.g.
# FLAGS_conv_workspace_size_limit) pass through too. DRY_RUN=1 prints the command instead of running it.
set -eu
cd "$(dirname "$0")"
PY=${PY:-python}
[ -x .venv/bin/python ] && [ "${PY}" = python ] && PY=.venv/bin/python

# Split launch flags from train flags.
LAUNCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus|--devices|--nproc_per_node|--ips|--master|--nnodes|--rank|--host|--log_dir|--job_id|--start_port)
      [ $# -ge 2 ] || { echo "train.sh: $1 needs a value" >&2; exit 2; }
      LAUNCH="$LAUNCH $1 $2"; shift 2 ;;
    --gpus=*|--devices=*|--nproc_per_node=*|--ips=*|--master=*|--nnodes=*|--rank=*|--host=*|--log_dir=*|\
    --job_id=*|--start_port=*)
      LAUNCH="$LAUNCH $1"; shift ;;
    *) break ;;
  esac
done

if [ $# -eq 0 ]; then
  # The embedded default: a preset of flags (sd/configs/tiny_default.args), demo data made on first use.
  sh scripts/prepare_demo_data.sh
  # One flag per line; quoted values keep their spaces.
  eval "set -- $(grep -v '^#' sd/configs/tiny_default.args | tr '\n' ' ')"
fi

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "$@"; else exec "$@"; fi
}
if [ -n "$LAUNCH" ]; then
  # shellcheck disable=SC2086
  [ "${DRY_RUN:-0}" = 1 ] || "$PY" scripts/preflight.py $LAUNCH -- "$@"
  # shellcheck disable=SC2086
  run "$PY" -u -m paddle.distributed.launch $LAUNCH train.py "$@"
else
  run "$PY" -u train.py "$@"
fi
