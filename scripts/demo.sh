#!/usr/bin/env bash
# The main job on the embedded offline default: explain the sample photo "coffee" with
# EfficientNet-Lite0 and write a self-contained report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pullback-widgets explain --sample coffee --out report.html "$@"
