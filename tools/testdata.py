"""The test data the repository carries in tests/data: speech clips, the Qwen3 tokenizer and the CTC vocabulary.

Licences and provenance: tests/data/PROVENANCE.md; checksums: tests/data/SHA256SUMS (`sha256sum -c` there).
The Qwen3 tokenizer's vocab.json and merges.txt are not stored: both are derived byte for byte from tokenizer.json
(as PROVENANCE.md records) when a checkpoint is written, and checked against the upstream files' SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "tests" / "data"
AUDIO = TESTDATA / "audio"
QWEN3_TOKENIZER = TESTDATA / "tokenizer" / "qwen3"
CTC_VOCAB = TESTDATA / "tokenizer" / "funasr_nano_ctc_candidate" / "multilingual_zh_ja_yue_char_del.tiktoken"
# the upstream Qwen3-0.6B files (PROVENANCE.md, "Qwen3 tokenizer")
DERIVED_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
}


def write_qwen3_tokenizer(dest: Path) -> None:
    """tokenizer.json, tokenizer_config.json, vocab.json and merges.txt of Qwen3-0.6B into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(QWEN3_TOKENIZER / "tokenizer_config.json", dest / "tokenizer_config.json")
    with gzip.open(QWEN3_TOKENIZER / "tokenizer.json.gz", "rb") as f:
        raw = f.read()
    (dest / "tokenizer.json").write_bytes(raw)
    model = json.loads(raw)["model"]
    derived = {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False, separators=(",", ":")).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(" ".join(m) for m in model["merges"]) + "\n").encode(),
    }
    for name, data in derived.items():
        if hashlib.sha256(data).hexdigest() != DERIVED_SHA256[name]:
            raise RuntimeError(f"{name} derived from {QWEN3_TOKENIZER / 'tokenizer.json.gz'} is not the upstream file")
        (dest / name).write_bytes(data)
