#!/usr/bin/env bash
# `make device-check [DRY=1]`: the GPU check of docs/benchmarks.md in one time-boxed run
# (tfx/bench/device.py says what it measures). The device machine has Python with torch,
# triton, transformers, safetensors, numpy, PIL and tensorboard, no network and not this
# project: `make device-wheels` (where PyPI is reachable) puts every other wheel it needs into
# .whl/, and this script installs them with `pip --no-index` into a temporary target that goes
# first on PYTHONPATH (so the carried transformers, which the code is tested with, wins).
# DRY=1: the same steps on a CPU at tiny sizes, with this checkout's .venv (CI runs it);
# DRY=1 WHEELS=1 TFX_PYTHON=... also installs .whl/, to try the carried set on a CPU.
# Reports: $OUT (or bench_out/device/) device-check.md, one .md/.csv per step, logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/device}
mkdir -p "$OUT"
DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
  PY=${TFX_PYTHON:-.venv/bin/python}
else
  PY=${TFX_PYTHON:-python3}
fi
echo "device-check: $("$PY" -c 'import sys; print(sys.version.split()[0])') at $(command -v "$PY" || echo "$PY")"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" != 1 ] || [ "${WHEELS:-0}" = 1 ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "device-check: no wheels in .whl/: run 'make device-wheels' where PyPI is reachable"
    exit 2
  fi
  SITE=$(mktemp -d /tmp/tfx-device-site.XXXXXX)
  t0=$(date +%s)
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
      >"$OUT/wheels.log" 2>&1; then
    echo "device-check: pip could not install the wheels; unpacking them instead"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" .whl/*.whl || { echo "device-check: unpacking failed"; exit 2; }
  fi
  echo "device-check: $(ls .whl/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 )) s"
  export PYTHONPATH="$SITE:$PYTHONPATH" TFX_DEVICE_SITE="$SITE"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
  exec "$PY" -m tfx.bench.device --out "$OUT" --dry ${ONLY:+--only "$ONLY"}
fi
exec "$PY" -m tfx.bench.device --out "$OUT" ${ONLY:+--only "$ONLY"}
