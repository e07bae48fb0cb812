#!/usr/bin/env bash
# CI: make a Docker engine available and build the sandbox image(s). Root, no stdin.
#  1. install docker.io (and debootstrap for the offline image path) with apt-get if missing;
#  2. start dockerd if no daemon answers, and wait for it;
#  3. build the images through sandbox_env.kernels.docker.images.build_images (Hub if reachable, else offline),
#     then the farm's (server, gateway, Prometheus: sandbox_env.farm_images, always offline) and
#     install Debian's docker-compose (1.29) for the farm's tests.
# Any failure is fatal: in CI a missing Docker is an error, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export DOCKER_BUILDKIT=0  # no buildx plugin on these machines

need_apt=()
# The docker CLI alone may be present (a client without an engine): look for the daemon.
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || need_apt+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "docker-setup: installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if ! docker info >/dev/null 2>&1; then
    echo "docker-setup: starting dockerd"
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { echo "docker-setup: dockerd did not come up"; tail -50 /tmp/dockerd.log; exit 1; }
fi
docker version --format 'docker-setup: engine {{.Server.Version}}'

"$PYTHON" -c 'import docker' 2>/dev/null || "$PYTHON" -m pip install -q 'docker>=7.0'
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'PY'
import logging, sys
logging.basicConfig(level=logging.INFO, format="docker-setup: %(message)s")
from sandbox_env.kernels.docker.images import build_images, build_language_images, python_image_tag
from sandbox_env.kernels.docker.daemon import runtime_report
from sandbox_env.farm_images import build_farm_images
built = build_images(offline=None)
print("docker-setup: built", built or "nothing (cached)", "->", python_image_tag())
languages = build_language_images(["all"])  # C, C++, Node.js, Rust: the Python image + a toolchain layer
print("docker-setup: language images built", languages or "nothing (cached)")
farm = build_farm_images(monitoring=True)  # a tag whose sources changed is rebuilt
print("docker-setup: farm images built", farm or "nothing (up to date)")
runtime_report()
PY
