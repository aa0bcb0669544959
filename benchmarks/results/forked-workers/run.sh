#!/usr/bin/env bash
# gunicorn --preload with two sync workers on 127.0.0.1 serving app.py (one btdeploy model loaded and
# run once in the master), four requests, then SIGTERM to the master: how long the shutdown takes.
# usage: EXPORT=<export dir> run.sh onnxruntime|openvino   (gunicorn importable, e.g. on PYTHONPATH)
set -u
export BACKEND=$1
cd "$(dirname "$0")"
log="${TMPDIR:-/tmp}/forked-workers.$1.log"  # gunicorn's own log, outside the results
python -m gunicorn --preload -w 2 -b 127.0.0.1:8765 --graceful-timeout 60 --timeout 120 app:app > "$log" 2>&1 &
master=$!
for _ in $(seq 60); do curl -s -m 5 127.0.0.1:8765 > /dev/null && break; sleep 1; done
for _ in 1 2 3 4; do curl -s -m 30 127.0.0.1:8765; echo; done
started=$(date +%s.%N); kill -TERM "$master"; wait "$master"; ended=$(date +%s.%N)
echo "$1: shutdown took $(python -c "print(round($ended - $started, 1))") s (gunicorn's log: $log)"
