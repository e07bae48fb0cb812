#!/bin/sh
# The farm's one URL, said once at start (`docker-compose up` shows it), then HAProxy in the
# foreground (master-worker: SIGTERM stops it, SIGUSR2 reloads).
set -eu
: "${FARM_REPLICAS_HOST:=server}"
export FARM_REPLICAS_HOST
echo "sandbox-env farm: give clients ${SANDBOX_FARM_URL:-http://<this host>:8000} (token: SANDBOX_ENV_TOKEN from the farm's env file)"
echo "sandbox-env farm: replicas of '${FARM_REPLICAS_HOST}' join the rotation as their /readyz answers"
exec haproxy -W -db -f /etc/haproxy/haproxy.cfg
