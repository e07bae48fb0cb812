#!/bin/sh
# Prometheus reads the bearer token from a file: write the farm's token (from the env file) to
# the container's private tmpfs, never to the image.
set -eu
umask 077
printf '%s' "${SANDBOX_ENV_TOKEN:?the farm token (SANDBOX_ENV_TOKEN) is missing}" > /tmp/farm-token
unset SANDBOX_ENV_TOKEN
exec /usr/bin/prometheus --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/tmp/prometheus \
     --storage.tsdb.retention.time=2d --web.listen-address=:9090 "$@"
