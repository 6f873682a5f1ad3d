"""The test data the repository carries (tests/data) is complete and unchanged: every file is listed in SHA256SUMS
with its checksum, and the Qwen3 tokenizer files derived from tokenizer.json are the upstream ones."""

from __future__ import annotations

import hashlib

from tools.testdata import DERIVED_SHA256, TESTDATA, write_qwen3_tokenizer


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_file_is_listed_with_its_checksum():
    listed = dict(reversed(line.split("  ", 1)) for line in (TESTDATA / "SHA256SUMS").read_text().splitlines())
    present = {str(p.relative_to(TESTDATA)) for p in TESTDATA.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert present == set(listed)
    for name, digest in listed.items():
        assert sha256(TESTDATA / name) == digest, name


def test_derived_tokenizer_files_are_the_upstream_ones(tmp_path):
    write_qwen3_tokenizer(tmp_path)
    for name, digest in DERIVED_SHA256.items():
        assert sha256(tmp_path / name) == digest
    assert (tmp_path / "tokenizer.json").stat().st_size > 10_000_000
