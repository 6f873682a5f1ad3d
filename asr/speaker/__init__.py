"""Who spoke when: CAM++ speaker embeddings (`campplus`: the network and its fbank frontend, pure MLX), the official
clustering backend (`cluster`), windows and turns (`diarize`) and the diarization error rate (`der`). The CAM++
checkpoint is read by asr.loading.speaker. Import the modules by name: this package imports no MLX itself.
"""
