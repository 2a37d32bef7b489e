#!/usr/bin/env bash
# One command for a first GPU box: tools/gpu_check.py's stages (preflight, a killed and resumed paper-shaped run on
# both layouts, the GPU part of make bench), at most 8 minutes on one GPU, every output in one folder (OUT/gpu-check
# when OUT is set, else runs/gpu-check/<time>). docs/gpu-runs/README.md says how to run it and where the results go.
#
#   tools/gpu_check.sh [--devices cuda:0,cuda:0] [--stages ...] [--out DIR] [--quick]
#   tools/gpu_check.sh --fetch-wheels    # here, with PyPI: the packages a bare GPU box lacks, into .whl/
#
# A box without repro's packages (hydra-core, omegaconf, antlr4) installs them from .whl/ (carried beside the code)
# into a folder of its own; repro itself is used from this checkout, installed or not.
set -u
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if [ "${1:-}" = "--fetch-wheels" ]; then
    # pure-Python wheels of the versions installed here (antlr4 4.9.3 is published as source only: built here)
    versions=$("$python" -c 'from importlib.metadata import version
print(*(name + "==" + version(name) for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))') || exit 2
    set -- $versions
    mkdir -p .whl
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl "$1" "$2" && "$python" -m pip wheel --quiet --no-deps -w .whl "$3" \
        && ls .whl
    exit $?
fi

if ! "$python" -c 'import hydra, omegaconf' 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: hydra-core and omegaconf are missing and there is no .whl/ to install them from: run" \
             "tools/gpu_check.sh --fetch-wheels where pip reaches PyPI, and carry .whl/ with the code" >&2
        exit 2
    fi
    site=$(mktemp -d /tmp/gpu-check-site-XXXX)
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" tools/gpu_check.py "$@"
