#!/usr/bin/env bash
# The test suite: creates the environment when missing, makes sure Redis answers, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k deploy).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/env.sh
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "no Redis on 127.0.0.1:6379: starting one"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" --logfile "${TMPDIR:-/tmp}/ldd-redis.log"
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
# The web UI's tests drive Debian's chromium through chromedriver; install them where apt can (root, or sudo
# without a password). Elsewhere tests/test_ui.py skips and says what is missing.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "installing chromium and chromium-driver for the web UI's browser tests"
    export DEBIAN_FRONTEND=noninteractive
    { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver; } \
      >"${TMPDIR:-/tmp}/ldd-apt.log" 2>&1 \
      || echo "could not install chromium (see ${TMPDIR:-/tmp}/ldd-apt.log): the browser tests will skip"
  else
    echo "no chromium/chromedriver and no apt-get as root: the browser tests will skip"
  fi
fi
ruff check .
ruff format --check .
exec python -m pytest -q --timeout 600 --durations=15 "$@"
