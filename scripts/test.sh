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
ruff check .
exec python -m pytest -q --timeout 600 --durations=15 "$@"
