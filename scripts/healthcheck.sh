#!/usr/bin/env bash
# supervisor event listener (TICK_5): superlance's httpok restarts `zimage` when /healthz does not answer
# 200 within ZIMAGE_HEALTH_TIMEOUT seconds (default 10) while it is RUNNING.
host=${ZIMAGE_HOST:-127.0.0.1}
case "$host" in 0.0.0.0|"") host=127.0.0.1 ;; esac
exec httpok -p zimage -t "${ZIMAGE_HEALTH_TIMEOUT:-10}" "http://$host:${ZIMAGE_PORT:-7860}/healthz"
