"""CTC branch: tokenizer, forced alignment and per-token timestamps against the official code.

Goldens (tools/reference_ctc.py, funasr 1.4.16 + torchaudio 2.11 forced_align):
  fixtures/ctc_tokenizer.json  SenseVoiceTokenizer (tiktoken) encode/decode of a corpus
  fixtures/ctc_viterbi.json    the official tools/utils.py::forced_align on tiny random inputs (ties included)
  fixtures/ctc_parity.json     ctc_text / timestamps / ctc_timestamps of generate() on real clips, tiny random
                               CTC checkpoints (tools.checkpoint ctc=True; one with the blank's bias raised)
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import asr
from asr.audio.io import load_audio
from asr.errors import InvalidOptionError
from asr.model import ctc

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VOCAB = Path("tokenizer/funasr_nano_ctc_candidate/multilingual_zh_ja_yue_char_del.tiktoken")


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tokenizer(testdata) -> ctc.CTCTokenizer:
    return ctc.CTCTokenizer.from_file(testdata / VOCAB)


# --- tokenizer ------------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_tokenizer_layout_matches_official(tokenizer, testdata):
    g = _load("ctc_tokenizer.json")
    assert _sha256(testdata / VOCAB) == g["vocab_sha256"]
    assert tokenizer.n_vocab == g["n_vocab"] == 60515  # = ctc_vocab_size; blank = 60514 = <|30.00|>
    assert tokenizer.timestamp_begin == g["timestamp_begin"]
    assert tokenizer.no_speech == g["no_speech"]
    names = list(tokenizer.specials)
    assert len(names) == g["special_count"]
    assert hashlib.sha256("\n".join(names).encode()).hexdigest() == g["special_names_sha256"]
    assert [[k, tokenizer.specials[k]] for k in names[:3]] == g["special_first"]


@pytest.mark.parity
def test_tokenizer_encode_decode_match_official(tokenizer):
    g = _load("ctc_tokenizer.json")
    for case in g["encode"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
    for case in g["decode"]:
        assert tokenizer.decode(case["ids"]) == case["text"], case["ids"]
    for i, text in g["decode_single"].items():
        assert tokenizer.decode([int(i)]) == text


def test_tokenizer_round_trip(tokenizer):
    g = _load("ctc_tokenizer.json")
    for case in g["encode"]:
        assert tokenizer.decode(tokenizer.encode(case["text"])) == case["text"]
    # special-token strings are plain text to encode; their ids decode to the string; timestamps decode to nothing
    assert tokenizer.decode([tokenizer.no_speech]) == "<|nospeech|>"
    assert tokenizer.no_speech not in tokenizer.encode("<|nospeech|>")
    assert tokenizer.decode([tokenizer.timestamp_begin, tokenizer.n_vocab - 1]) == ""
    assert tokenizer.encode("\ud800x") == tokenizer.encode("\ufffdx")  # lone surrogate, as tiktoken


# --- forced alignment -----------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_forced_align_matches_official_on_tiny_inputs():
    g = _load("ctc_viterbi.json")
    aligned = 0
    for case in g["cases"]:
        lp = np.array(case["log_probs"], dtype=np.float32)
        got = [list(x) for x in ctc.forced_align(lp, case["targets"], case["blank"])]
        assert got == case["items"], case
        aligned += bool(got)
    assert aligned > 100  # the fixture also holds infeasible and blank-in-targets cases (-> [])


def _collapse(path, blank):
    return [k for k, _ in itertools.groupby(path) if k != blank]


def _brute_force_best(lp: np.ndarray, targets: list[int], blank: int) -> float | None:
    """Best total log-prob over every frame labelling that collapses to `targets` (None if there is none)."""
    T = lp.shape[0]
    symbols = sorted(set(targets) | {blank})
    best = None
    for path in itertools.product(symbols, repeat=T):
        if _collapse(path, blank) == targets:
            s = float(lp[np.arange(T), list(path)].astype(np.float64).sum())
            best = s if best is None else max(best, s)
    return best


def test_forced_align_is_the_best_path_brute_force():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        V, T = int(rng.integers(2, 5)), int(rng.integers(1, 8))
        blank = int(rng.integers(0, V))
        labels = [v for v in range(V) if v != blank]
        targets = [int(rng.choice(labels)) for _ in range(int(rng.integers(1, 5)))]
        logits = rng.standard_normal((T, V)).astype(np.float32) * 2
        lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
        items = ctc.forced_align(lp, targets, blank)
        best = _brute_force_best(lp, targets, blank)
        if best is None:
            assert items == []
            continue
        checked += 1
        assert [k for k, *_ in items] == targets
        path = np.full(T, blank)
        for k, s, e, score in items:
            path[s:e] = k
            assert score == round(float(np.exp(lp[s:e, k]).max()), 3)
        assert _collapse(path.tolist(), blank) == targets
        assert abs(float(lp[np.arange(T), path].astype(np.float64).sum()) - best) < 1e-4
    assert checked > 80


def test_forced_align_edge_cases():
    lp = np.log(np.full((4, 3), 1 / 3, dtype=np.float32))
    assert ctc.forced_align(lp, [], 2) == []
    assert ctc.forced_align(lp, [0, 2], 2) == []  # blank among the targets
    assert ctc.forced_align(lp, [0, 3], 2) == []  # id beyond the vocabulary
    assert ctc.forced_align(lp, [0, 0, 0], 2) == []  # 3 tokens + 2 repeats > 4 frames
    assert [x[:3] for x in ctc.forced_align(lp, [0, 1, 0, 1], 2)] == [(0, 0, 1), (1, 1, 2), (0, 2, 3), (1, 3, 4)]


# --- the model: parity with the official generate() ------------------------------------------------------------------
def _ts(items: list[ctc.TokenTimestamp]) -> list[list]:
    return [[x.token, x.start, x.end, x.score] for x in items]


def _official_ts(items: list[dict]) -> list[list]:
    return [[x["token"], x["start_time"], x["end_time"], x["score"]] for x in items]


@pytest.fixture(scope="module", params=range(len(_load("ctc_parity.json")["runs"])), ids=lambda i: f"run{i}")
def ctc_run(request, tmp_path_factory, model_cache):
    from tools.reference_ctc import write_ctc_checkpoint

    run = _load("ctc_parity.json")["runs"][request.param]
    ck = run["checkpoint"]
    out = write_ctc_checkpoint(tmp_path_factory.mktemp("ctc") / "Fun-ASR-Nano-tiny-ctc", seed=ck["seed"],
                               blank_boost=ck.get("ctc_blank_bias_boost") or 0.0)
    if _sha256(out / "model.pt") != run["model_pt_sha256"]:
        pytest.fail("tools/checkpoint.py now writes different random weights; regenerate fixtures/ctc_parity.json "
                    "(tools/reference_ctc.py)")
    model = asr.load_model(str(out), dtype="float32")
    return run, model, ctc.CTCTokenizer.from_file(model.model_dir / "multilingual.tiktoken")


@pytest.mark.parity
def test_ctc_outputs_match_official(ctc_run, testdata):
    run, model, tok = ctc_run
    assert model.has_ctc and ctc.blank_id(model.net) == run["blank"]
    assert _sha256(model.model_dir / "multilingual.tiktoken") == run["vocab_sha256"]
    assert len(run["entries"]) >= 3
    for e in run["entries"]:
        clip = testdata / e["clip"]
        assert _sha256(clip) == e["clip_sha256"]
        enc = model.encode(model.features(load_audio(str(clip)).samples))
        lp = ctc.ctc_log_probs(model.net, enc)
        assert lp.shape == (e["frames"], ctc.blank_id(model.net) + 1)
        logp_max = np.asarray(lp.max(axis=-1))
        assert np.abs(logp_max - np.array(e["logp_max"])).max() < 2e-3, e["name"]
        res = ctc.ctc_result(model.net, enc, e["text"], tok)
        assert res.ctc_text == e["ctc_text"], e["name"]
        assert _ts(res.timestamps) == _official_ts(e["timestamps"]), e["name"]
        assert _ts(res.ctc_timestamps) == _official_ts(e["ctc_timestamps"]), e["name"]
        # token ids too (several ids decode to the same U+FFFD string)
        assert tok.encode(e["text"]) == e["text_target_ids"]
        assert tok.encode(res.ctc_text) == e["ctc_target_ids"]
        lpn = np.asarray(lp)
        assert [k for k, *_ in ctc.forced_align(lpn, e["text_target_ids"], run["blank"])] == e["text_align_ids"]
        assert [k for k, *_ in ctc.forced_align(lpn, e["ctc_target_ids"], run["blank"])] == e["ctc_align_ids"]
        # the one-shot helper agrees with the pieces
        assert _ts(ctc.timestamps(model.net, enc, e["text"], tok)) == _ts(res.timestamps)


def test_offset_and_batched_log_probs(ctc_run, testdata):
    run, model, tok = ctc_run
    e = run["entries"][0]
    enc = model.encode(model.features(load_audio(str(testdata / e["clip"])).samples))
    base = ctc.timestamps(model.net, enc, e["text"], tok)
    moved = ctc.timestamps(model.net, enc, e["text"], tok, offset_s=12.34)
    assert base and [(m.start, m.end) for m in moved] == [(round(b.start + 12.34, 3), round(b.end + 12.34, 3))
                                                          for b in base]
    # [B, L, D] with lengths (padded batch) gives the same log-probs on the valid rows
    L = enc.shape[0]
    batch = mx.stack([mx.pad(enc, [(0, 7), (0, 0)]), mx.pad(enc[: L - 5], [(0, 12), (0, 0)])])
    lp_b = ctc.ctc_log_probs(model.net, batch, mx.array([L, L - 5]))
    assert np.abs(np.asarray(lp_b[0, :L]) - np.asarray(ctc.ctc_log_probs(model.net, enc))).max() < 1e-4
    assert np.abs(np.asarray(lp_b[1, : L - 5]) - np.asarray(ctc.ctc_log_probs(model.net, enc[: L - 5]))).max() < 1e-4


def test_checkpoint_without_ctc(tiny_model):
    assert not tiny_model.has_ctc
    assert getattr(tiny_model.net, "ctc_decoder", None) is None
    enc = mx.zeros((10, tiny_model.cfg.encoder.output_size))
    with pytest.raises(InvalidOptionError, match="CTC"):
        ctc.timestamps(tiny_model.net, enc, "hello", None)
