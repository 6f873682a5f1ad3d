# source me on the GPU machine after setup.sh
export PYTHONPATH=/root/site:$PWD MLX_PTX_CACHE_DIR=/root/ptx FUNASR_NANO_CACHE=/root/cache PYTHONUNBUFFERED=1
CLIPS="tests/data/audio/en/jfk.wav tests/data/audio/zh/example_zh.wav"
