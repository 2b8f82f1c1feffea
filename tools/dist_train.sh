#!/usr/bin/env bash
# Usage: tools/dist_train.sh CONFIG GPUS [train.py args]; torchrun through mmengine's launcher.
CONFIG=$1
GPUS=$2
PORT=${PORT:-29500}
shift 2
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "$@"
