#!/usr/bin/env bash
# Install what the browser test (tests/test_browser.py) drives: Debian's
# chromium and its matching chromedriver, and selenium in the project's venv.
# Idempotent: each step runs only when its part is missing, so `make test` can
# call it every time. Debian's chromedriver is built from the same source as
# Debian's chromium, so the two versions always match (no driver download).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

need_apt=()
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" fonts-liberation >/dev/null
fi

if ! "$PYTHON" -c "import selenium" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "selenium>=4.20"
fi

# Check the browser binary itself, not Debian's /usr/bin/chromium launcher: the
# launcher sources /etc/chromium.d/dev-shm, which runs
# `[ $(findmnt -bnr -o avail -T /dev/shm) -lt 4080218931 ]` unquoted; where
# /dev/shm is mounted more than once (containers) findmnt prints one number per
# mount and `[` fails with "unexpected operator". The check only decides
# whether to add --disable-dev-shm-usage, which the browser test passes itself,
# so the launcher still starts the browser correctly there.
/usr/lib/chromium/chromium --version >/dev/null
/usr/bin/chromedriver --version >/dev/null
