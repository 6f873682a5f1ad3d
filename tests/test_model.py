"""Model-level behaviour on a tiny random checkpoint: loading, caching, errors, options, segments, batching."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

import asr
from asr.decode.loop import find_loop
from asr.errors import (
    AudioDecodeError,
    AudioNotFoundError,
    CheckpointError,
    EmptyAudioError,
    InvalidOptionError,
    ModelLoadError,
    UnsupportedLanguageError,
)
from asr.loading import checkpoint as ckpt
from asr.pipeline import FunASRNano


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- loading -------------------------------------------------------------------------------------------
def test_official_dir_is_converted_once_and_cached(tiny_checkpoint, tiny_model, model_cache):
    conv = ckpt.converted_dir_for(tiny_checkpoint)
    assert conv.is_relative_to(model_cache)
    assert (conv / ckpt.MLX_CONFIG).is_file() and (conv / ckpt.MLX_WEIGHTS).is_file()
    stamp = (conv / ckpt.MLX_WEIGHTS).stat().st_mtime_ns
    again = asr.load_model(str(tiny_checkpoint), dtype="float32")
    assert (conv / ckpt.MLX_WEIGHTS).stat().st_mtime_ns == stamp  # not converted again
    # the converted directory itself is a loadable model (source (c))
    direct = asr.load_model(str(conv), dtype="float32")
    samples = np.random.default_rng(1).standard_normal(16000 * 3).astype(np.float32) * 0.1
    a = again.transcribe(samples, max_new_tokens=6, vad=False)
    b = direct.transcribe(samples, max_new_tokens=6, vad=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


def test_model_properties(tiny_model):
    assert tiny_model.variant == "nano"
    assert tiny_model.dtype == "float32"
    assert [lg.code for lg in tiny_model.languages][:3] == ["zh", "en", "ja"]


@pytest.mark.parametrize("variant", ["mlt", "nano"])
def test_variant_override(tiny_checkpoint, variant):
    m = asr.load_model(str(tiny_checkpoint), dtype="float32", variant=variant)
    assert m.variant == variant
    assert ("ko" in {lg.code for lg in m.languages}) == (variant == "mlt")


def test_broken_model_dirs(tmp_path, tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="not found"):
        asr.load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model.pt"):
        asr.load_model(str(tmp_path))  # empty directory
    with pytest.raises(ModelLoadError, match="is a file"):
        asr.load_model(str(tiny_checkpoint / "config.yaml"))

    # truncated model.pt
    d = _copy(tiny_checkpoint, tmp_path / "trunc")
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt"):
        asr.load_model(str(d))
    assert not ckpt.converted_dir_for(d).exists()  # nothing half-written

    # config pointing outside the model directory
    d = _copy(tiny_checkpoint, tmp_path / "outside")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["llm_conf"]["init_param_path"] = "../../etc"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        asr.load_model(str(d))

    # mismatched config: dims that do not fit the tensors
    d = _copy(tiny_checkpoint, tmp_path / "mismatch")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["audio_encoder_conf"]["linear_units"] = int(cfg["audio_encoder_conf"]["linear_units"]) * 2
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        asr.load_model(str(d))

    # a config.yaml that is not FunASRNano
    d = _copy(tiny_checkpoint, tmp_path / "other")
    (d / "config.yaml").write_text("model: Paraformer\n")
    with pytest.raises(CheckpointError, match="FunASRNano"):
        asr.load_model(str(d))

    # missing tokenizer
    d = _copy(tiny_checkpoint, tmp_path / "notok")
    (d / "Qwen3-0.6B" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        asr.load_model(str(d))


def test_missing_tensor_is_named(tmp_path, model_cache):
    from asr.loading.torch_zip import load_state_dict
    from tools.checkpoint import write_checkpoint
    from tools.torch_zip_writer import save_state_dict

    d = write_checkpoint(tmp_path / "missing", size="tiny", seed=3)
    state = load_state_dict(d / "model.pt")
    del state["audio_adaptor.linear1.bias"]
    save_state_dict(d / "model.pt", {k: (v.dtype, v.array) for k, v in state.items()})
    with pytest.raises(CheckpointError, match="missing.*adaptor.linear1.bias"):
        asr.load_model(str(d))


def test_hub_offline_without_cache_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        asr.load_model("FunAudioLLM/Fun-ASR-Nano-2512", download_root=tmp_path / "hub", local_files_only=True)


def test_bad_load_options(tiny_checkpoint):
    with pytest.raises(InvalidOptionError):
        asr.load_model(str(tiny_checkpoint), dtype="int3")
    with pytest.raises(InvalidOptionError):
        asr.load_model(str(tiny_checkpoint), quantize=3)
    with pytest.raises(InvalidOptionError, match="fp16"):
        asr.load_model(str(tiny_checkpoint), encoder_dtype="float16")


def test_quantized_llm_is_cached(tiny_checkpoint):
    m = asr.load_model(str(tiny_checkpoint), dtype="float32", quantize=8)
    cached = list(m.model_dir.glob("llm-q8g64-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    m2 = asr.load_model(str(tiny_checkpoint), dtype="float32", quantize=8)
    assert cached[0].stat().st_mtime_ns == stamp
    r = m2.transcribe(np.zeros(16000, np.float32) + 0.01, max_new_tokens=3, vad=False)
    assert len(r.token_ids) <= 3


# --- transcribe: inputs and options ----------------------------------------------------------------------
def test_result_fields(tiny_model, testdata):
    r = tiny_model.transcribe(str(testdata / "audio/en/jfk.wav"), max_new_tokens=8)
    assert r.timings.audio_duration_s == pytest.approx(11.0)
    assert r.timings.generated_tokens == len(r.token_ids) <= 8
    assert r.timings.prompt_tokens == 18 + 23 + 5  # 11 s -> 184 LFR frames -> ceil(184/8) = 23 audio rows
    for name in ("features_s", "encoder_s", "adaptor_s", "prefill_s", "decode_s", "total_s"):
        assert getattr(r.timings, name) > 0
    assert len(r.segments) == 1 and r.segments[0].start == 0.0 and r.segments[0].end == pytest.approx(11.0)
    assert r.segments[0].token_ids == r.token_ids
    assert r.language_source in ("detected", "unknown") and r.language_method == "script-heuristic"
    assert r.finish_reason in ("stop", "length", "repetition")


def test_language_spellings(tiny_model):
    samples = np.random.default_rng(2).standard_normal(16000 * 2).astype(np.float32) * 0.1
    ref = tiny_model.transcribe(samples, language="en", max_new_tokens=4, vad=False)
    assert ref.language == "en" and ref.language_source == "requested" and ref.language_method is None
    for spelling in ("English", "英文", " EN "):
        assert tiny_model.transcribe(samples, language=spelling, max_new_tokens=4, vad=False).token_ids == ref.token_ids
    assert tiny_model.prompt_ids("auto") == tiny_model.prompt_ids(None)
    with pytest.raises(UnsupportedLanguageError) as err:
        tiny_model.transcribe(samples, language="Klingon")
    assert "zh" in err.value.valid and "Klingon" in str(err.value)


def test_options_change_the_prompt(tiny_model):
    base = tiny_model.prompt_ids()
    assert len(base.prefix) == 18 and len(base.suffix) == 5
    assert len(tiny_model.prompt_ids(language="zh").prefix) == 20
    assert len(tiny_model.prompt_ids(itn=False).prefix) == 24
    assert len(tiny_model.prompt_ids(hotwords=["开放时间", "Americans"]).prefix) == 58
    assert tiny_model.prompt_ids(hotwords="开放时间") == tiny_model.prompt_ids(hotwords=["开放时间"])


@pytest.mark.parametrize("bad", [123, [1, 2], ["x" * 500], ["w"] * 1000])
def test_bad_hotwords(tiny_model, bad):
    with pytest.raises(InvalidOptionError):
        tiny_model.transcribe(np.zeros(16000, np.float32), hotwords=bad)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": 10**6}, {"batch_size": 0},
                                    {"max_segment_s": 1000}])
def test_bad_transcribe_options(tiny_model, kwargs):
    with pytest.raises(InvalidOptionError):
        tiny_model.transcribe(np.zeros(16000, np.float32), **kwargs)


def test_bad_audio_inputs(tiny_model, tmp_path):
    with pytest.raises(AudioNotFoundError):
        tiny_model.transcribe(str(tmp_path / "missing.wav"))
    with pytest.raises(AudioNotFoundError):
        tiny_model.transcribe(str(tmp_path))
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(EmptyAudioError):
        tiny_model.transcribe(str(tmp_path / "empty.wav"))
    (tmp_path / "text.wav").write_text("this is not audio at all " * 50)
    with pytest.raises(AudioDecodeError):
        tiny_model.transcribe(str(tmp_path / "text.wav"))
    with pytest.raises(EmptyAudioError):
        tiny_model.transcribe(np.zeros(100, np.float32))
    with pytest.raises(AudioDecodeError):
        tiny_model.transcribe(np.full(16000, np.nan, np.float32))


def test_silence_gives_no_text(tiny_model):
    r = tiny_model.transcribe(np.zeros(16000 * 8, np.float32))
    assert r.text == "" and r.segments == [] and r.token_ids == []
    assert r.finish_reason == "empty" and "no speech detected" in r.warnings


def test_numpy_rates_and_bytes(tiny_model, testdata):
    path = testdata / "audio/zh/example_zh.wav"
    by_path = tiny_model.transcribe(str(path), max_new_tokens=6)
    by_bytes = tiny_model.transcribe(path.read_bytes(), max_new_tokens=6)
    assert by_path.token_ids == by_bytes.token_ids
    mp3 = tiny_model.transcribe(str(testdata / "audio/original/example_zh_48k.mp3"), max_new_tokens=6)
    assert mp3.timings.audio_duration_s == pytest.approx(5.616, abs=0.05)


def test_progress_and_cancel(tiny_model, testdata):
    import threading

    events = []
    tiny_model.transcribe(str(testdata / "audio/long/voxpopuli_en_test_000.wav"), max_new_tokens=4, batch_size=1,
                          progress=lambda d, t, m: events.append((d, t)))
    done = [d for d, _ in events]
    assert done == sorted(done) and done[-1] == pytest.approx(events[-1][1], abs=0.5) and len(done) >= 3

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(asr.TranscriptionCancelled):
        tiny_model.transcribe(str(testdata / "audio/en/jfk.wav"), cancel=cancel)


# --- long audio, batching, repetition guard --------------------------------------------------------------
def test_long_audio_segments_and_batching(tiny_model, testdata):
    path = str(testdata / "audio/long/voxpopuli_en_test_000.wav")
    seq = tiny_model.transcribe(path, max_new_tokens=12, batch_size=1, repetition_guard=False)
    bat = tiny_model.transcribe(path, max_new_tokens=12, batch_size=4, repetition_guard=False)
    assert len(seq.segments) >= 3
    assert all(s.end - s.start <= 30.0 + 1e-6 for s in seq.segments)
    assert [s.start for s in seq.segments] == sorted(s.start for s in seq.segments)
    assert [s.token_ids for s in seq.segments] == [s.token_ids for s in bat.segments]
    assert seq.segments[-1].end <= 69.24 + 1e-6


class Recorder:
    """An LLM runner that records the batch sizes it is started with and passes them on to another, announcing
    `warm` as the batch sizes whose first use compiles something."""

    def __init__(self, inner, warm: list[int] | None = None):
        self.inner, self.warm, self.sizes = inner, warm or [], []
        self.description, self.embeds_dtype = inner.description, inner.embeds_dtype

    def start(self, prompts, lengths):
        self.sizes.append(len(lengths))
        return self.inner.start(prompts, lengths)

    def warm_batches(self, batch_size: int) -> list[int]:
        return [n for n in self.warm if n <= batch_size]


def with_llm(model, llm) -> FunASRNano:
    """The same loaded model with another LLM runner."""
    return FunASRNano(model.net, model.cfg, model.tokenizer, replace(model.runtime, llm=llm), name=model.name,
                      dtype=model.dtype, quantization=model.quantization, encoder_dtype=model.encoder_dtype,
                      model_dir=model.model_dir)


def test_default_batch_and_warmup(tiny_model, testdata):
    """transcribe decodes 16 segments at a time unless told otherwise; warm-up decodes a clip, a batch of two, then a
    batch of every size the runner says compiles something (CUDA's one-launch rows step: one per row tile)."""
    runner = Recorder(tiny_model.runtime.llm, warm=[2, 17, 33, 49])
    model = with_llm(tiny_model, runner)
    model.warmup()
    assert runner.sizes == [1, 2]
    runner.sizes.clear()
    model.warmup(batch_size=40)
    assert runner.sizes == [1, 2, 17, 33]
    runner.sizes.clear()
    long = asr.audio.load_audio(str(testdata / "audio/long/voxpopuli_en_test_000.wav")).samples
    r = model.transcribe(np.concatenate([long] * 7), max_new_tokens=2)  # ~480 s: more than 16 segments
    assert len(r.segments) > 16 and runner.sizes == [16] * (len(r.segments) // 16) + [len(r.segments) % 16] * bool(
        len(r.segments) % 16)


def test_vad_false_decodes_everything_in_one_pass(tiny_model, testdata):
    r = tiny_model.transcribe(str(testdata / "audio/long/voxpopuli_en_test_000.wav"), max_new_tokens=4, vad=False)
    assert len(r.segments) == 1 and any("VAD is off" in w for w in r.warnings)


def test_find_loop_cuts_loops_only():
    assert find_loop([7] * 40) == 1
    assert find_loop([1, 2] + [3, 4, 5, 6] * 9) == 6
    assert find_loop(list(range(100))) is None
    varied = [int(x) for x in np.random.default_rng(0).integers(0, 1000, 300)]
    assert find_loop(varied) is None
    assert find_loop([5] * 31) is None  # too short to call it a loop


class Looper:
    """An LLM runner stuck on one token."""

    description = "a looping decoder"
    embeds_dtype = mx.float32

    def start(self, prompts, lengths):
        def step(tokens):
            return mx.full(tokens.shape, 1234, dtype=mx.int32)

        return mx.full((len(lengths),), 1234, dtype=mx.int32), step

    def warm_batches(self, batch_size):
        return []


def test_repetition_guard_on_a_looping_model(tiny_model):
    """A looping decoder: the guard stops it and says so; switched off, it runs to the limit."""
    model = with_llm(tiny_model, Looper())
    samples = np.random.default_rng(3).standard_normal(16000 * 2).astype(np.float32) * 0.1
    on = model.transcribe(samples, max_new_tokens=100, vad=False)
    off = model.transcribe(samples, max_new_tokens=100, vad=False, repetition_guard=False)
    assert on.finish_reason == "repetition" and on.token_ids == [1234]
    assert any("repetition" in w for w in on.warnings)
    assert off.finish_reason == "length" and off.token_ids == [1234] * 100


def test_cli(tiny_checkpoint, testdata, capsys, tmp_path):
    from asr.cli import main

    clip = str(testdata / "audio/ja/example_ja.wav")
    assert main(["transcribe", "-m", str(tiny_checkpoint), "--dtype", "float32", "--max-new-tokens", "4",
                 "-f", "json", clip]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["timings"]["audio_duration_s"] == pytest.approx(7.224) and "segments" in out
    assert main(["transcribe", "-m", str(tiny_checkpoint), "--max-new-tokens", "4", "-f", "srt",
                 "-o", str(tmp_path), clip]) == 0
    assert (tmp_path / "example_ja.srt").read_text().startswith("1\n00:00:00,000 --> 00:00:07,224\n")
    assert main(["transcribe", "-m", str(tiny_checkpoint), "-l", "xx", clip]) == 2
    assert "not supported" in capsys.readouterr().err
    assert main(["transcribe", "-m", str(tiny_checkpoint), "--batch-size", "0", clip]) == 1
    assert "batch_size must be an integer in 1..256" in capsys.readouterr().err
    assert main(["transcribe", "-m", str(tiny_checkpoint), str(tmp_path / "nope.wav")]) == 1
    assert main(["languages", "--variant", "mlt"]) == 0
    assert "韩文" in capsys.readouterr().out


def test_timestamps_only_with_a_ctc_head(tmp_path, tiny_model, testdata):
    from tools.checkpoint import write_checkpoint

    r = tiny_model.transcribe(str(testdata / "audio/en/jfk.wav"), max_new_tokens=4)
    assert r.timestamps is None and "no CTC head" in r.timestamps_note
    assert all(s.timestamps is None for s in r.segments)

    m = asr.load_model(str(write_checkpoint(tmp_path / "ctc", size="tiny", seed=0, ctc=True)), dtype="float32")
    assert m.timestamps_available
    r = m.transcribe(str(testdata / "audio/long/voxpopuli_en_test_000.wav"), max_new_tokens=6)
    assert r.timestamps and r.timestamps_note == ""
    for seg in r.segments[1:]:
        assert seg.timestamps and all(seg.start <= ts.start <= ts.end <= 69.3 for ts in seg.timestamps)
    assert [ts for s in r.segments for ts in s.timestamps] == r.timestamps


def test_hub_id_resolves_from_the_hf_cache_offline(tmp_path, tiny_checkpoint):
    """A repo id is loaded through huggingface_hub's cache (here pre-filled, offline) and named by its id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--FunAudioLLM--Fun-ASR-MLT-Nano-2512"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    m = asr.load_model("FunAudioLLM/Fun-ASR-MLT-Nano-2512", dtype="float32", download_root=tmp_path / "hf" / "hub",
                       local_files_only=True)
    assert m.name == "FunAudioLLM/Fun-ASR-MLT-Nano-2512" and m.variant == "mlt"  # variant from the repo name


def test_batched_features_and_prompts_match_one_by_one(tiny_model, testdata):
    """features_padded and prompt_batch (one pass for a whole batch) give, row for row, what features and
    prompt_embeddings give for each utterance alone, with zeros in the padding."""
    import mlx.core as mx

    from asr.audio.features import audio_token_count, features, features_padded
    from asr.audio.io import load_audio

    clips = [load_audio(testdata / "audio" / "en" / "jfk.wav").samples,
             load_audio(testdata / "audio" / "zh" / "example_zh.wav").samples,
             np.random.default_rng(0).standard_normal(999).astype(np.float32) * 0.1]
    feats, lengths = features_padded(clips)
    assert feats.shape[0] == 3 and feats.shape[1] == max(lengths) and lengths[2] == 1
    for i, s in enumerate(clips):
        ours, alone = np.array(feats[i, : lengths[i]]), np.array(features(mx.array(s)))
        if mx.default_device() == mx.cpu:
            assert np.array_equal(ours, alone)
        else:  # GPU kernels sum a batch in another order than one utterance (and the mel product runs in TF32)
            np.testing.assert_allclose(ours, alone, rtol=1e-3, atol=1e-3)
        assert not np.array(feats[i, lengths[i]:]).any()
    ids = tiny_model.prompt_ids("en")
    rows = mx.random.normal((3, 40, tiny_model.net.llm.args.hidden_size), key=mx.random.key(1))
    counts = [audio_token_count(n) for n in lengths]
    prompts, plens = tiny_model.prompt_batch(rows, counts, ids)
    assert prompts.shape[:2] == (3, max(plens))
    for i, c in enumerate(counts):
        alone = np.array(tiny_model.prompt_embeddings(rows[i, :c], ids)[0])
        assert plens[i] == alone.shape[0]
        got = np.array(prompts[i])
        assert np.array_equal(got[prompts.shape[1] - plens[i]:], alone) and not got[: prompts.shape[1] - plens[i]].any()


def test_transcribe_many_gives_each_audio_what_it_gets_alone(tiny_model, testdata):
    """Segments of several audios decoded together (longest first, batches across audios): each result has the
    tokens and segments of that audio transcribed alone; on_segment reports each audio's segments in time order."""
    clips = sorted(str(p) for p in (testdata / "audio").glob("*/*.wav"))
    alone = [tiny_model.transcribe(c, max_new_tokens=6) for c in clips]
    seen: list[tuple[int, float]] = []
    many = tiny_model.transcribe_many(clips, max_new_tokens=6, batch_size=5,
                                      on_segment=lambda i, s: seen.append((i, s.start)))
    assert len(many) == len(clips)
    for a, b in zip(alone, many, strict=True):
        assert b.token_ids == a.token_ids and b.text == a.text
        assert [(s.start, s.end, s.token_ids) for s in b.segments] == [(s.start, s.end, s.token_ids) for s in a.segments]
        assert b.timings.audio_duration_s == a.timings.audio_duration_s
    assert sorted(seen) == sorted((i, s.start) for i, r in enumerate(alone) for s in r.segments)
    for i in range(len(clips)):
        starts = [s for j, s in seen if j == i]
        assert starts == sorted(starts)
    assert len({i for i, _ in seen[:5]}) > 1  # a batch held segments of several audios
