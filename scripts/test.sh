#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,lab,compare
# The browser tests drive Debian's Chromium (never `playwright install`, which downloads).
if [ ! -x /usr/bin/chromium ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium
fi
.venv/bin/python -m pytest "$@"
