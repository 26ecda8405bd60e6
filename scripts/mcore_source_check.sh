#!/usr/bin/env bash
# Run the version-sensitive tests against a megatron-core release whose wheel does not install
# here: 0.19.2 requires Python >= 3.12, but its Python source runs on 3.11. The wheel is unpacked
# (not installed) and put first on PYTHONPATH over .venv's megatron-core, with what it needs that
# .venv lacks: triton (imported unconditionally from 0.19; never called on CPU) and its dataset
# helper compiled for this Python. Evidence for the versions we read but cannot install; not a
# supported way to run.
#   make test-mcore-source            (0.19.2, the compat leg's tests), or
#   bash scripts/mcore_source_check.sh VERSION TESTS...
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$1
shift
PY=.venv/bin/python
DIR=.venv-mcore-$VERSION-source
if [ ! -f "$DIR/.unpacked" ]; then
  rm -rf "$DIR"
  mkdir -p "$DIR/wheel"
  $PY -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
    "megatron-core==$VERSION" -d "$DIR/wheel"
  $PY -m zipfile -e "$DIR"/wheel/megatron_core-*.whl "$DIR/src"
  $PY -m pip install -q --no-deps --target "$DIR/extra" triton pybind11
  helpers="$DIR/src/megatron/core/datasets"
  suffix=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  # shellcheck disable=SC2046  # pybind11 --includes is a list of -I flags
  g++ -O3 -shared -std=c++17 -fPIC $(PYTHONPATH="$DIR/extra" $PY -m pybind11 --includes) \
    "$helpers/helpers.cpp" -o "$helpers/helpers_cpp$suffix"
  touch "$DIR/.unpacked"
fi
PYTHONPATH="$PWD/$DIR/src:$PWD/$DIR/extra" $PY -c \
  "import megatron.core.package_info as p, sys; assert p.__version__.split('+')[0] == sys.argv[1], p.__version__; print('megatron-core', p.__version__, 'from', p.__file__)" "$VERSION"
PYTHONPATH="$PWD/$DIR/src:$PWD/$DIR/extra" exec $PY -m pytest -q -n 2 --dist loadgroup \
  -k "not real_models" "$@"
