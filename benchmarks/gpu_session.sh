#!/usr/bin/env bash
# One lent-GPU session: install the carried FLA wheels, then run the named steps, each under its own
# time limit, logging to $OUT. Triton's kernel cache (with FLA's autotune results) lives in .tcache and
# goes back as $OUT/tcache.tgz, so the next session can carry it and skip minutes of compilation.
#   bash benchmarks/gpu_session.sh kernels:240 layers:200 tests:120 hybrid:400
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# TRITON_CACHE_AUTOTUNING=1: Triton also keeps the autotune winners in its cache, so FLA's kernels are
# benchmarked once per shape and machine type, not once per process
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.tcache TRITON_CACHE_AUTOTUNING=1
mkdir -p "${OUT:=/tmp/out}"
# a cache carried back from an earlier session, as split parts of one tgz
if [ ! -d .tcache ] && ls .tcache_parts/tcache.tgz.part-* >/dev/null 2>&1; then cat .tcache_parts/tcache.tgz.part-* | tar xzf -; fi
mkdir -p "$TRITON_CACHE_DIR"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
for step in "$@"; do
  name=${step%%:*}; limit=${step##*:}
  echo "== $name (limit ${limit}s) $(date +%T)"
  case $name in
    kernels) cmd=(python3 benchmarks/bench_kernels_gpu.py --no-tests --out "$OUT/kernels_gpu_$dev.json") ;;
    layers) cmd=(python3 benchmarks/bench_layers_gpu.py --out "$OUT/layers_gpu_$dev.json") ;;
    # HYBRID_ARGS: extra arguments, e.g. HYBRID_ARGS="--contexts 1024 --variants sdpa_flash,hybrid"
    hybrid) cmd=(python3 benchmarks/bench_hybrid_gpu.py --out "$OUT/hybrid_gpu_$dev.json" ${HYBRID_ARGS:-}) ;;
    # decode speed, eager vs compiled (issue 10); it starts no case that would end within 60 s of the step's
    # limit, and writes its JSON after every case. DECODE_ARGS: e.g. DECODE_ARGS="--points 1x1k,64x8k"
    decode) cmd=(python3 benchmarks/bench_decode_gpu.py --out "$OUT/decode_gpu_$dev.json" --budget-s $((limit > 120 ? limit - 60 : limit / 2)) ${DECODE_ARGS:-}) ;;
    # prompt lookup vs greedy and one verification step's cost (issue 13), hybrid and Qwen3; it starts no case
    # that would end within 30 s of the step's limit. SPEC_ARGS: e.g. SPEC_ARGS="--repeats 1 --no-self-draft"
    speculative) cmd=(python3 benchmarks/bench_speculative_gpu.py --out "$OUT/speculative_gpu_$dev.json" --budget-s $((limit > 60 ? limit - 30 : limit / 2)) ${SPEC_ARGS:-}) ;;
    # where the compiled static-cache decode step's time goes (issue 10): the raw CUDA-graph step's ms, kernels and
    # GPU busy time against generate()'s ms/step, hybrid and Qwen3, B=1 1k and 32k (two ~40 s compiles per case,
    # ~6-7 min for the four); it starts no case that would end within 60 s of the step's limit, and writes its JSON
    # after every case. PROFILE_ARGS: e.g. PROFILE_ARGS="--models hybrid --contexts 32768"
    profile) cmd=(python3 benchmarks/profile_compiled_step_gpu.py --out "$OUT/profile_compiled_step_gpu_$dev.json" --budget-s $((limit > 120 ? limit - 60 : limit / 2)) ${PROFILE_ARGS:-}) ;;
    # every gpu-marked test under tests/ (a new GPU test file runs without being named here), one line
    # per test (a step cut off still shows what passed), JUnit XML kept
    # tests/conftest.py: SWAA_GPU_TEST_FIRST_CONFIG=1 stops autotuning at the first working config
    # (every config computes the same thing) and the winners are not written to the shared cache
    tests) cmd=(env SWAA_GPU_TEST_FIRST_CONFIG=1 FLA_CACHE_RESULTS=0 TRITON_CACHE_AUTOTUNING=0 python3 -X faulthandler -m pytest -v -m gpu --durations=15 --junitxml="$OUT/tests_gpu_$dev.xml" tests/) ;;
    *) echo "unknown step $name"; continue ;;
  esac
  # SWAA_STACKS=N: dump every thread's stack each N seconds, to see where a slow step spends its time (the
  # script's folder goes first on sys.path, as python puts it there for a script: `import common` works)
  if [ -n "${SWAA_STACKS:-}" ] && [ "${cmd[0]}" = python3 ]; then
    cmd=(python3 -X faulthandler -c "import faulthandler, runpy, sys; faulthandler.dump_traceback_later($SWAA_STACKS, repeat=True); sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rpartition('/')[0] or '.'); runpy.run_path(sys.argv[0], run_name='__main__')" "${cmd[@]:1}")
  fi
  timeout "$limit" "${cmd[@]}" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"
  tail -n 40 "$OUT/$name.log"
done
# at most 8 files come back: logs and JSON travel as one tarball, the cache as 15 MB parts
(cd "$OUT" && tar czf results.tgz --remove-files ./*.log ./*.json ./*.xml 2>/dev/null)
tar czf /tmp/tcache.tgz -C "$PWD" .tcache && split -b 15m /tmp/tcache.tgz "$OUT/tcache.tgz.part-"; ls -la "$OUT"
