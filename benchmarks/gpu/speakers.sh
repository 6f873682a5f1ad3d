#!/usr/bin/env bash
# GPU machine, after setup.sh: what speakers= adds to a long file's transcription (benchmarks/diarization.py), and
# the CAM++ stage parity suite on the GPU (goldens of the official code made on the CPU, carried in
# .cache/spk-gold-tiny). SciPy (the clustering's eigh) is not on the machine: its wheel is parked in /root/stage
# by an earlier call (carry .whl/scipy).
set -u
. benchmarks/gpu/env.sh
if ! python3 -c "import scipy" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/stage/scipy-*.whl
fi
python3 -m benchmarks.diarization --model /root/ck/full --minutes ${MINUTES:-3} --rounds 2 --json $OUT/diar.json ${DIAR_ARGS:-} \
  2>&1 | tee $OUT/diar.log | tail -12
if [ -d .cache/spk-gold-tiny ]; then
  MLX_ENABLE_TF32=0 FUNASR_SPEAKER_GOLDENS=.cache/spk-gold-tiny python3 -m pytest -q -s -p no:cacheprovider \
    tests/test_speaker_parity.py -k "stage or embeddings or batches" 2>&1 | grep -v "^  " | tail -15
fi
