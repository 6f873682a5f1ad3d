# source me on the GPU machine after setup.sh
export PYTHONPATH=/root/site:$PWD MLX_PTX_CACHE_DIR=/root/ptx FUNASR_NANO_CACHE=/root/cache PYTHONUNBUFFERED=1
export FUNASR_TESTDATA=$PWD/.work/testdata
CLIPS=".work/testdata/audio/en/jfk.wav .work/testdata/audio/zh/example_zh.wav"
