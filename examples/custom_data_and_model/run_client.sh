#!/usr/bin/env bash
# Usage: ./run_client.sh RANK        (RANK = 1, 2, ...; CONFIG=... to use another config)
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" torch_client.py --cf "${CONFIG:-config/fedml_config.yaml}" --rank "${1:?usage: run_client.sh RANK}" --role client
