#!/usr/bin/env bash
# One lent-GPU session: install the carried FLA wheels, then run the named steps, each under its own
# time limit, logging to $OUT. Triton's kernel cache (with FLA's autotune results) lives in .tcache and
# goes back as $OUT/tcache.tgz, so the next session can carry it and skip minutes of compilation.
#   bash benchmarks/gpu_session.sh kernels:240 layers:200 tests:120 hybrid:400
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.tcache
mkdir -p "$TRITON_CACHE_DIR" "${OUT:=/tmp/out}"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
for step in "$@"; do
  name=${step%%:*}; limit=${step##*:}
  echo "== $name (limit ${limit}s) $(date +%T)"
  case $name in
    kernels) cmd=(python3 benchmarks/bench_kernels_gpu.py --out "$OUT/kernels_gpu_$dev.json") ;;
    layers) cmd=(python3 benchmarks/bench_layers_gpu.py --out "$OUT/layers_gpu_$dev.json") ;;
    hybrid) cmd=(python3 benchmarks/bench_hybrid_gpu.py --out "$OUT/hybrid_gpu_$dev.json") ;;
    tests) cmd=(python3 -m pytest -q -m gpu -x --durations=10 tests) ;;
    *) echo "unknown step $name"; continue ;;
  esac
  timeout "$limit" "${cmd[@]}" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"
  tail -n 40 "$OUT/$name.log"
done
tar czf "$OUT/tcache.tgz" -C "$PWD" .tcache 2>/dev/null; ls -la "$OUT"
