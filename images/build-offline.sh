#!/usr/bin/env bash
# Build the sandbox image without Docker Hub: debootstrap from the host's apt mirror, import, build.
# Same as `sandbox-env images build --offline`; needs root, debootstrap and a running dockerd.
set -euo pipefail
cd "$(dirname "$0")/.."
export DOCKER_BUILDKIT=0
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -c '
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from sandbox_env.kernels.docker.images import build_images
print(build_images(offline=True, force="--force" in sys.argv))
' "$@"
