# Source this on a GPU machine where nothing can be installed from a registry:
#   . bench/gpu_env.sh
# It installs the wheels carried in .whl/ (diffusers and what it needs beyond the machine's image)
# into /tmp/site, and makes this checkout importable as omni_fp8 by linking its folders into the
# layout pyproject.toml maps (omni_fp8 = converter/facade, omni_fp8.converter = converter, ...).
set -e
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/omni-pkg && mkdir -p /tmp/omni-pkg/omni_fp8
cp converter/facade/*.py converter/facade/py.typed /tmp/omni-pkg/omni_fp8/
for part in converter runtime manifests; do ln -s "$PWD/$part" "/tmp/omni-pkg/omni_fp8/$part"; done
export PYTHONPATH="/tmp/omni-pkg:/tmp/site:$PWD/tests:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
set +e
