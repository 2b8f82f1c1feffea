#!/usr/bin/env bash
# Usage: tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]; torchrun through mmengine's launcher.
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
PORT=${PORT:-29500}
shift 3
exec "${PYTHON:-python}" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
