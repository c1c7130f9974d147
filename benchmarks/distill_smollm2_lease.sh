# The lent-GPU glue used for benchmarks/distill_smollm2.py (issue 12): sourced there as
#   bash -c '. benchmarks/distill_smollm2_lease.sh; setup; ...'
# It expects, carried as ignored folders: .whl (FLA + gguf wheels), .distdata (pydocs.txt.gz, gguf.sha256,
# smol-tok/), and the GGUF in two parts, .smolX/part-x (first call: keep_part) and .smolY/part-y (second
# call: assemble), since one call carries at most 64 MiB and ignored files stay while the machine is held.
# benchmarks/distill_smollm2_carry.sh builds those folders here; with `prep` it also runs the prep step on
# this machine's CPU (.distdata/prep), so the GPU's minutes go to training.
# The sequence, each call right after the last (the machine stays held 30 s after a call):
#   1 (carry .whl .smolX): setup && keep_part
#   2 (carry .distdata .smolY): setup && assemble && use_prep && launch --first-config --steps N --max-minutes M \
#        && gputests_detached && wait_runs S        (without .distdata/prep: prep instead of use_prep)
#   3: setup; wait_runs S; table; pack
# Memory: a SmolLM2 run at batch 16 (8 per micro-batch) x 512 takes 12-14 GB, mostly the KL's
# full-vocabulary softmax; ten runs and the GPU tests overfilled an H200's 140 GB once (2026-12-02).

set -u
setup() {
  [ -d /tmp/site/fla ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.tcache TRITON_CACHE_AUTOTUNING=1 TOKENIZERS_PARALLELISM=false
  if [ ! -d .tcache ] && ls .tcache_parts/tcache.tgz.part-* >/dev/null 2>&1; then cat .tcache_parts/tcache.tgz.part-* | tar xzf -; fi
  mkdir -p "$TRITON_CACHE_DIR" "$OUT"
  [ -f /tmp/pydocs.txt ] || zcat .distdata/pydocs.txt.gz > /tmp/pydocs.txt
  DEV=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
  echo "setup done on $DEV $(date +%T)"
}
# the GGUF's first part waits on the machine (ignored files stay while it is warm) until the call that
# carries the second
keep_part() { mkdir -p /tmp/smol && cp .smolX/part-x /tmp/smol/ && ls -la /tmp/smol; }
assemble() {
  cat /tmp/smol/part-x .smolY/part-y > /tmp/smol.gguf
  echo "$(cut -d' ' -f1 .distdata/gguf.sha256)  /tmp/smol.gguf" | sha256sum -c - || return 1
}
# prep's outputs made on another machine (distill_smollm2_carry.sh prep)
use_prep() { mkdir -p /tmp/runs && cp .distdata/prep/* /tmp/runs/ && cat /tmp/runs/train_ids.json; }
# the GPU tests in their own session, beside the runs (their timing does not matter); pack brings the log
gputests_detached() { setsid bash -c '. benchmarks/distill_smollm2_lease.sh; setup >/dev/null; gputests 400' >/dev/null 2>&1 < /dev/null & }
gputests() {
  env SWAA_GPU_TEST_FIRST_CONFIG=1 FLA_CACHE_RESULTS=0 TRITON_CACHE_AUTOTUNING=0 timeout "${1:-150}" python3 -m pytest -q -m gpu \
    tests/layers/test_sliding_window_gpu.py tests/layers/test_speculative.py -p no:cacheprovider -v > /tmp/gputests.log 2>&1
  echo "rc=$?" >> /tmp/gputests.log
}
# a SmolLM2-shaped teacher with random weights: warms the Triton/FLA autotune cache for the runs' shapes
# and times one process's optimizer step
warm() {
  python3 -c "
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
c = AutoConfig.from_pretrained('.distdata/smol-tok'); AutoModelForCausalLM.from_config(c).save_pretrained('/tmp/probe-t')
AutoTokenizer.from_pretrained('.distdata/smol-tok').save_pretrained('/tmp/probe-t')" || return 1
  for k in gla swa_gla; do
    /usr/bin/time -f "$k wall %e s" timeout "${1:-200}" python3 -m swaa distill /tmp/probe-t /tmp/probe/$k --linear-layers every:2 --kind $k \
      --data /tmp/pydocs.txt --transfer-steps 5 --window 512 --batch-size 16 --gradient-accumulation-steps 2 --steps 30 \
      --eval-every 30 --eval-windows 32 --save-every 30 --lora-rank 8 --bf16 --no-progress > "$OUT/warm-$k.log" 2>&1
    grep -h -E "train_runtime|distilled|Error|wall" "$OUT/warm-$k.log" | tail -n 4
  done
}
prep() {
  python3 benchmarks/distill_smollm2.py prep /tmp/smol.gguf /tmp/runs --first-config --pydocs /tmp/pydocs.txt --shards "${SHARDS:-7}" \
    --samples "${SAMPLES:-32}" --tokens "${TOKENS:-384}" > "$OUT/prep.log" 2>&1; rc=$?; tail -n 3 "$OUT/prep.log"; return $rc
}
launch() {  # launch ARGS...: every run, detached (they outlive this call)
  OMP_NUM_THREADS=2 python3 benchmarks/distill_smollm2.py launch /tmp/smol.gguf /tmp/runs "$@"
}
# wait S: until every run has its report, or S seconds; status each minute
wait_runs() {
  local end=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    python3 benchmarks/distill_smollm2.py status /tmp/runs | cut -c1-150; echo "-- $(date +%T)"
    n=$(ls /tmp/runs/*.log | wc -l); d=$(ls /tmp/runs/*/report.json 2>/dev/null | wc -l)
    pack >/dev/null
    [ "$d" -ge "$n" ] && break
    sleep 15
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
}
pack() {  # the runs' logs, reports and stage files back under $OUT (models stay)
  cp /tmp/gputests.log "$OUT/tests_gpu_swa_spec_$DEV.log" 2>/dev/null
  (cd /tmp/runs && tar czf "$OUT/runs.tgz" *.log train_ids.json select.json */report.json */run.json */stages.json */checkpoints/*/trainer_state.json 2>/dev/null)
  ls -la "$OUT"
}
table() {
  python3 benchmarks/distill_smollm2.py table /tmp/smol.gguf /tmp/runs --out "$OUT" --device-name "$DEV" > "$OUT/table.log" 2>&1; tail -n 20 "$OUT/table.log"
}
