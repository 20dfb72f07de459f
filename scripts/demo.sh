#!/usr/bin/env bash
# The main job end to end: the service in embedded mode, a teacher, a distilled and a plain student, /detect.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/env.sh
exec python -m api.demo "$@"
