#!/usr/bin/env bash
# Create .venv if missing and install this package into it, with the extras given as $1
# (e.g. "dev,lab"). Everything comes from the package registries; nothing else is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
