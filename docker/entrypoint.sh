#!/bin/sh
# Fetches the models into the models volume on the first start (a few minutes,
# about 680 MB), then runs the command (default: ragd serve).
set -e
if [ ! -f "$RAGD_MODELS_DIR/.fetched" ]; then
    echo "ragd: fetching the models into $RAGD_MODELS_DIR (first start)" >&2
    python3 /opt/ragd/scripts/fetch-models --models-dir "$RAGD_MODELS_DIR"
    touch "$RAGD_MODELS_DIR/.fetched"
fi
exec "$@"
