"""Transcribe one file with the library API.

    python examples/transcribe.py AUDIO [MODEL_DIR_OR_REPO_ID]
"""

import sys

import asr


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        model = asr.load_model(sys.argv[2] if len(sys.argv) > 2 else None)
        result = model.transcribe(sys.argv[1])
    except asr.ASRError as exc:  # typed errors say what is wrong and how to fix it
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.text)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    t = result.timings
    print(f"[{result.language} ({result.language_source}), {t.audio_duration_s:.1f} s audio in {t.total_s:.2f} s, "
          f"{t.generated_tokens} tokens at {t.decode_tokens_per_s:.0f} tok/s; {result.runtime.backend} backend]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
