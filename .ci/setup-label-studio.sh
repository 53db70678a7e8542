#!/usr/bin/env bash
# Create .ls-venv with Label Studio 1.23.2 in its own virtualenv (its pins clash with ours), every package at the
# version .ci/label-studio.lock names, and check that it really starts (a venv that imports may still not serve).
# A venv built from another lock, or one that does not start, is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=.ci/label-studio.lock
stamp=$(sha256sum "$lock" .ci/label-studio.in | sha256sum | cut -c1-16)

starts() {  # start Label Studio on a free loopback port with a scratch data folder; 0 once /health answers 200
  local data port pid code=1
  data=$(mktemp -d)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  env -u LABEL_STUDIO_URL LABEL_STUDIO_BASE_DATA_DIR="$data" ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false \
    COLLECT_ANALYTICS=false .ls-venv/bin/label-studio start --no-browser --internal-host 127.0.0.1 --port "$port" \
    --data-dir "$data" >"$data/label-studio.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 240); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ]; then code=0; break; fi
    sleep 1
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ "$code" -ne 0 ]; then
    echo "Label Studio in .ls-venv did not start; the end of its log:" >&2
    tail -n 15 "$data/label-studio.log" >&2
  fi
  rm -rf "$data"
  return "$code"
}

if [ -f .ls-venv/.lock-stamp ] && [ "$(cat .ls-venv/.lock-stamp)" = "$stamp" ]; then
  if starts; then
    echo "Label Studio 1.23.2 from $lock already in .ls-venv (it starts)"
    exit 0
  fi
  echo "rebuilding .ls-venv" >&2
fi
rm -rf .ls-venv
python3 -m venv .ls-venv
.ls-venv/bin/pip install -q --disable-pip-version-check -r .ci/label-studio.in -c "$lock"
.ls-venv/bin/python -m pip check
if ! starts; then
  echo "Label Studio from $lock does not start in a fresh venv: regenerate the lock (bash .ci/lock) or pin the culprit in .ci/label-studio.in" >&2
  exit 1
fi
echo "$stamp" > .ls-venv/.lock-stamp
.ls-venv/bin/python -c "import label_studio; print('label-studio', label_studio.__version__, 'from $lock: it starts')"
