#!/usr/bin/env bash
# Usage: ./run_server.sh            (CONFIG=path/to/fedml_config.yaml to use another config)
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" torch_server.py --cf "${CONFIG:-config/fedml_config.yaml}" --rank 0 --role server
