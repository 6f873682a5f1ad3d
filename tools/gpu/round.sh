#!/usr/bin/env bash
# One GPU call after stage1.sh: setup, the CUDA decode-step tests, the per-clip profile with the PersistentStep A/B,
# then the side-by-side benchmark (final.sh) with whichever decode step won the A/B.
set -u
bash tools/gpu/setup.sh > $OUT/setup.log 2>&1; tail -1 $OUT/setup.log
. tools/gpu/env.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_decode.py -k "compiled_step" 2>&1 | tail -3
timeout 150 python3 tools/gpu/profile_clip.py --model /root/ck/full --clip .work/testdata/audio/en/jfk.wav --repeats 5 \
  2>&1 | grep -v "torch_complex\|miss key\|^Failed to import" > $OUT/profile.log
head -12 $OUT/profile.log; grep "^==" $OUT/profile.log
ms() { grep "PersistentStep $1" $OUT/profile.log | grep -o "median *[0-9.]*" | awk '{print $2}'; }
on=$(ms on); off=$(ms off)
if python3 -c "import sys; sys.exit(0 if '$on' and '$off' and float('$on') < float('$off') else 1)"; then
  echo "PersistentStep on for the benchmark (on: $on ms, off: $off ms)"
else
  echo "PersistentStep off for the benchmark (on: $on ms, off: $off ms)"; export FUNASR_NANO_PERSISTENT=0
fi
MODES="${MODES:-bf16 bf16-enc16}" timeout 300 bash tools/gpu/final.sh
