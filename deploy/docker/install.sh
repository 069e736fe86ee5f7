#!/bin/sh
# Install shmalloc from a source tree into one Python environment.
#
#   deploy/docker/install.sh SRC_DIR [PYTHON]
#
# SRC_DIR  the repository root (the directory holding pyproject.toml).
# PYTHON   the interpreter whose environment receives the package
#          (default: python3). Its own pip is used (`PYTHON -m pip`), so a
#          venv's python installs into that venv.
# SHMALLOC_EXTRAS  extras to install (default: metrics); empty for none.
#
# The Dockerfile RUNs this script, and tests/test_deploy_install.py runs it into a
# fresh venv, so the image and the test install the same way.
#
# Steps: pip-install SRC_DIR with its extras; install the example worker
# (deploy/examples/demo_worker.py) as `shmalloc-demo-worker` next to the
# `shmalloc` script, bound to PYTHON; smoke-test both entry points.
set -eu

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 SRC_DIR [PYTHON]" >&2
    exit 2
fi
src=$1
python=${2:-python3}
extras=${SHMALLOC_EXTRAS-metrics}

if [ ! -f "$src/pyproject.toml" ]; then
    echo "$0: $src/pyproject.toml not found: SRC_DIR must be the repository root" >&2
    exit 2
fi

if [ -n "$extras" ]; then
    target="$src[$extras]"
else
    target="$src"
fi

# --no-cache-dir: nothing of pip's cache ends up in an image layer.
"$python" -m pip install --no-cache-dir --disable-pip-version-check "$target"

# Where console scripts of this environment go (/usr/local/bin in the image,
# <venv>/bin in a venv), and the interpreter to bind the demo worker to.
scripts=$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
exe=$("$python" -c 'import sys; print(sys.executable)')

demo="$scripts/shmalloc-demo-worker"
{
    echo "#!$exe"
    tail -n +2 "$src/deploy/examples/demo_worker.py"
} >"$demo"
chmod 0755 "$demo"

# Smoke test: fail the install (and the image build) if an entry point is
# broken.
"$scripts/shmalloc" --help >/dev/null
"$demo" --help >/dev/null
echo "installed shmalloc into $("$python" -c 'import sys; print(sys.prefix)')"
