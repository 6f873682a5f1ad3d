"""Transcribe one file with the library API.

    python examples/transcribe.py AUDIO [MODEL_DIR_OR_REPO_ID]
"""

import sys

import asr

model = asr.load_model(sys.argv[2] if len(sys.argv) > 2 else None)
result = model.transcribe(sys.argv[1])
print(result.text)
t = result.timings
print(f"[{result.language} ({result.language_source}), {t.audio_duration_s:.1f} s audio in {t.total_s:.2f} s, "
      f"{t.generated_tokens} tokens at {t.decode_tokens_per_s:.0f} tok/s]", file=sys.stderr)
