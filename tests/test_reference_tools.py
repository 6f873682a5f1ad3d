"""Random-weight checkpoints in the official layout (tools/checkpoint.py) and the golden token fixture.

The fixture tests/fixtures/golden_tiny_tokens.json comes from the official funasr code run on the tiny seed-0
checkpoint (tools/make_goldens.sh); these tests need neither torch nor the reference venv.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from asr.loading.torch_zip import load_state_dict
from tools import checkpoint as ck

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "golden_tiny_tokens.json"
IM_START, IM_END, NEWLINE, ASSISTANT = 151644, 151645, 198, 77091


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ck.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


# --- checkpoint writer ----------------------------------------------------------------------------------------


def test_tiny_checkpoint_has_every_key_with_shape_and_dtype(tiny_dir):
    state = load_state_dict(tiny_dir / "model.pt")
    spec = ck.state_dict_spec("tiny")
    assert list(state) == list(spec)
    for key, (shape, dtype) in spec.items():
        assert state[key].shape == shape, key
        assert state[key].dtype == dtype == "bfloat16", key
    assert not any(k.startswith(("ctc.", "ctc_decoder.")) for k in state)
    embed = state["llm.model.embed_tokens.weight"].array
    np.testing.assert_array_equal(state["llm.lm_head.weight"].array, embed)
    norm = state["audio_encoder.after_norm.weight"].to_float32()
    assert abs(norm.mean() - 1.0) < 0.05 and norm.std() < 0.2
    assert abs(state["audio_encoder.after_norm.bias"].to_float32()).max() < 0.2
    scales = ck.DEFAULT_SCALES["tiny"]
    assert abs(state["llm.model.layers.0.mlp.up_proj.weight"].to_float32().std() / scales.llm_std - 1) < 0.05
    assert abs(state["llm.model.embed_tokens.weight"].to_float32().std() / scales.llm_embed_std - 1) < 0.05


def test_tiny_checkpoint_is_deterministic_and_matches_fixture(tiny_dir, golden):
    digest = hashlib.sha256((tiny_dir / "model.pt").read_bytes()).hexdigest()
    # a different digest means the goldens were made from other weights: rerun UPDATE_FIXTURE=1 make_goldens.sh
    assert digest == golden["checkpoint"]["model_pt_sha256"]


def test_ctc_checkpoint_adds_fp32_ctc_tensors(tmp_path):
    out = ck.write_checkpoint(tmp_path / "ctc", size="tiny", seed=1, ctc=True)
    state = load_state_dict(out / "model.pt")
    ctc_keys = [k for k in state if k.startswith(("ctc.", "ctc_decoder."))]
    assert len(ctc_keys) == 4 + 2 * 16 + 2  # linear1/2, 2 blocks, ctc_lo
    assert all(state[k].dtype == "float32" for k in ctc_keys)
    assert state["ctc.ctc_lo.weight"].shape == (60515, 64)
    assert state["ctc_decoder.linear2.weight"].shape == (64, 128)


def test_model_directory_files_and_configs(tiny_dir):
    llm = tiny_dir / "Qwen3-0.6B"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt"):
        assert (llm / name).is_file(), name
    assert (tiny_dir / "multilingual.tiktoken").stat().st_size == 907395
    assert json.loads((llm / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] == "BPE"

    cfg = yaml.safe_load((tiny_dir / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["model"] == "FunASRNano"
    assert cfg["audio_encoder"] == "SenseVoiceEncoderSmall" and cfg["audio_adaptor"] == "Transformer"
    assert cfg["llm"] == "Qwen3-0.6b" and cfg["llm_conf"]["init_param_path"] == "Qwen3-0.6B"
    assert cfg["llm_conf"]["llm_dtype"] == "bf16" and cfg["llm_conf"]["hub"] == "hf"
    assert cfg["audio_encoder_conf"]["output_size"] == 64 and cfg["audio_encoder_conf"]["num_blocks"] == 3
    assert cfg["audio_adaptor_conf"]["use_low_frame_rate"] is True
    assert cfg["frontend"] == "WavFrontend"
    assert cfg["frontend_conf"] == {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25,
                                    "frame_shift": 10, "lfr_m": 7, "lfr_n": 6, "cmvn_file": None}
    assert "dither" not in cfg["frontend_conf"]  # the official default (1.0) applies unless the caller sets it
    assert cfg["tokenizer"] == "HuggingfaceTokenizer"
    assert cfg["tokenizer_conf"]["init_param_path"] == "${llm_conf.init_param_path}"
    assert cfg["dataset_conf"]["ctc_tokenizer"] == "SenseVoiceTokenizer"
    assert cfg["dataset_conf"]["ctc_tokenizer_conf"]["vocab_path"] == "multilingual.tiktoken"
    assert cfg["ctc_decoder"] == "Transformer" and cfg["ctc_decoder_conf"]["llm_dim"] == 64

    metas = json.loads((tiny_dir / "configuration.json").read_text())["file_path_metas"]
    assert metas["init_param"] == "model.pt" and metas["config"] == "config.yaml"
    assert metas["llm_conf"]["init_param_path"] == "Qwen3-0.6B"

    qwen = json.loads((llm / "config.json").read_text())
    assert qwen["architectures"] == ["Qwen3ForCausalLM"] and qwen["tie_word_embeddings"] is True
    assert (qwen["hidden_size"], qwen["num_hidden_layers"], qwen["num_attention_heads"],
            qwen["num_key_value_heads"], qwen["head_dim"], qwen["intermediate_size"]) == (64, 2, 4, 2, 16, 128)
    assert (qwen["vocab_size"], qwen["eos_token_id"], qwen["rope_theta"]) == (151936, IM_END, 1000000)
    info = json.loads((tiny_dir / "checkpoint_info.json").read_text())
    assert info["size"] == "tiny" and info["seed"] == 0


def test_full_size_table_matches_the_release_without_allocating():
    spec = ck.state_dict_spec("full", ctc=True)
    groups = {p: [k for k in spec if k.startswith(p)] for p in ("audio_encoder.", "audio_adaptor.", "llm.",
                                                               "ctc_decoder.", "ctc.")}
    # tensor counts reported for the released model.pt (spec §1.4: 914 / 36 / 311 / 84 / 2)
    assert [len(v) for v in groups.values()] == [914, 36, 311, 84, 2]
    numel = {p: sum(math.prod(spec[k][0]) for k in keys) for p, keys in groups.items()}
    assert round(numel["audio_encoder."] / 1e6, 2) == 221.14
    assert round(numel["audio_adaptor."] / 1e6, 2) == 12.60
    assert round((numel["llm."] - 151936 * 1024) / 1e6, 2) == 596.05  # lm_head stored but tied
    assert round((numel["ctc_decoder."] + numel["ctc."]) / 1e6, 2) == 39.07
    bf16 = sum(math.prod(s) for s, d in spec.values() if d == "bfloat16")
    assert bf16 == 985_374_304  # stored bf16 elements (spec §1.1)
    expect = {
        "audio_encoder.encoders0.0.self_attn.linear_q_k_v.weight": (1536, 560),
        "audio_encoder.encoders.48.self_attn.fsmn_block.weight": (512, 1, 11),
        "audio_encoder.tp_encoders.19.feed_forward.w_1.weight": (2048, 512),
        "audio_adaptor.linear1.weight": (2048, 512),
        "audio_adaptor.blocks.1.feed_forward.w_2.weight": (1024, 256),
        "llm.model.layers.27.self_attn.q_proj.weight": (2048, 1024),
        "llm.model.layers.27.self_attn.k_norm.weight": (128,),
        "llm.model.layers.0.mlp.down_proj.weight": (1024, 3072),
        "ctc_decoder.blocks.4.feed_forward.w_1.weight": (128, 512),
        "ctc.ctc_lo.weight": (60515, 512),
    }
    for key, shape in expect.items():
        assert spec[key][0] == shape, key
    assert spec["ctc.ctc_lo.bias"][1] == "float32" and spec["llm.lm_head.weight"][1] == "bfloat16"
    cfg = ck.config_dict("full")
    assert cfg["audio_encoder_conf"]["num_blocks"] == 50 and cfg["audio_adaptor_conf"]["ffn_dim"] == 2048
    assert ck.qwen3_config("full")["num_hidden_layers"] == 28


# --- golden fixture (official funasr outputs on the tiny checkpoint) -------------------------------------------


def test_fixture_covers_languages_mp3_and_options(golden):
    clips = {e["clip"] for e in golden["entries"]}
    assert len(clips) >= 6
    assert any(c.startswith("audio/zh/") for c in clips) and any(c.startswith("audio/en/") for c in clips)
    assert any(c.startswith("audio/ja/") for c in clips) and any(c.endswith(".mp3") for c in clips)
    options = [e["options"] for e in golden["entries"] if e["options"]]
    assert {"language": "英文"} in options and {"itn": False} in options
    assert {"hotwords": ["开放时间", "Americans"]} in options
    assert golden["versions"]["funasr"] == "1.4.16"


def test_fixture_prompt_layout(golden):
    # default prompt: 18 tokens before the audio, 5 after; language / itn / hotwords grow the prefix (spec §12)
    prefix = {(): 18, ("language",): 20, ("itn",): 24, ("hotwords",): 58}
    for e in golden["entries"]:
        ids, beg, n = e["prompt_ids"], e["fbank_beg"], e["fake_token_len"]
        assert n == math.ceil(e["speech_len"] / 8), e["name"]
        assert beg == prefix[tuple(e["options"])], e["name"]
        assert ids[beg : beg + n] == [0] * n and 0 not in ids[:beg] + ids[beg + n :]
        assert ids[:3] == [IM_START, 8948, NEWLINE]  # <|im_start|>system\n
        assert ids[beg + n :] == [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]


def test_fixture_greedy_ids_vary_between_clips_and_along_the_sequence(golden):
    """Trap test: an init that makes the model repeat one token would make token parity meaningless."""
    entries = golden["entries"]
    n_new = golden["max_new_tokens"]
    for e in entries:
        ids = e["greedy_ids"]
        assert len(ids) == n_new or ids[-1] == IM_END, e["name"]
        assert len(set(ids)) >= len(ids) // 2, f"{e['name']}: only {len(set(ids))} distinct ids"
        longest = max(len(list(run)) for _, run in itertools.groupby(ids))
        assert longest <= len(ids) // 3, f"{e['name']}: one id repeated {longest} times in a row"
        assert len(e["tf_margin"]) == len(ids) and min(e["tf_margin"]) >= 0
    sequences = [tuple(e["greedy_ids"]) for e in entries]
    assert len(set(sequences)) == len(sequences), "two entries decoded to the same ids"
    first = [e["greedy_ids"][0] for e in entries if not e["options"] and not e["clip"].endswith(".mp3")]
    assert len(set(first)) >= len(first) // 2, "the first token hardly depends on the audio"
    texts = [e["text"] for e in entries]
    assert len(set(texts)) == len(texts)
