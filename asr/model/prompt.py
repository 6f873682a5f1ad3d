"""The ChatML prompt around the audio, exactly as the official code builds and tokenizes it.

Reference: funasr/models/fun_asr_nano/model.py::get_prompt, ::generate_chatml, ::data_load_speech.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import InvalidOptionError, ModelLoadError

SYSTEM_PROMPT = "You are a helpful assistant."
SPEECH_PLACEHOLDER = "<|startofspeech|>!!<|endofspeech|>"
_SPEECH_SPLIT = re.compile(r"(<\|startofspeech\|>.*?<\|endofspeech\|>)")
_SPECIAL_MARKUP = re.compile(r"<\|[^<>|]*\|>")  # <|im_end|>, <|startofspeech|>, ...: tokenized as control tokens
_HOTWORD_HEADER = (
    "请结合上下文信息，更加准确地完成语音转写任务。如果没有相关信息，我们会留空。\n\n\n**上下文信息：**\n\n\n"
)

MAX_HOTWORDS = 200
MAX_HOTWORD_CHARS = 64


def instruction(hotwords: list[str] | None, language_prompt_name: str | None, itn: bool) -> str:
    """The user instruction before the audio (ref: get_prompt)."""
    prompt = ""
    if hotwords:
        prompt = _HOTWORD_HEADER + f"热词列表：[{', '.join(hotwords)}]\n"
    prompt += "语音转写" if language_prompt_name is None else f"语音转写成{language_prompt_name}"
    if not itn:
        prompt += "，不进行文本规整"
    return prompt + "："


def chatml(instruction_text: str) -> str:
    """The whole conversation with the speech placeholder (ref: generate_chatml + data_load_speech)."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{instruction_text}"
        f"{SPEECH_PLACEHOLDER}<|im_end|>\n<|im_start|>assistant\n"
    )


def clean_hotwords(hotwords: list[str] | str | None, special_tokens: Iterable[str] = ()) -> list[str]:
    """Validate hotwords: a list of short strings (a bare string is one hotword, not characters) holding none of the
    tokenizer's special tokens (`special_tokens`, PromptTokenizer.special_tokens: <think>, <tool_call>, ... would be
    encoded as control tokens, a prompt injection) and no <|...|> markup."""
    if hotwords is None:
        return []
    if isinstance(hotwords, str):
        hotwords = [hotwords]
    if not isinstance(hotwords, (list, tuple)):
        raise InvalidOptionError("hotwords must be a list of strings, e.g. ['Fun-ASR', '开放时间']")
    out: list[str] = []
    for word in hotwords:
        if not isinstance(word, str):
            raise InvalidOptionError(f"hotwords must be strings; got {type(word).__name__}")
        word = "".join(ch for ch in word if unicodedata.category(ch)[0] != "C").strip()
        if not word:
            continue
        markup = _SPECIAL_MARKUP.search(word)  # would be encoded as ChatML control tokens: a prompt injection
        special = markup.group() if markup else next((t for t in special_tokens if t in word), None)
        if special:
            raise InvalidOptionError(
                f"hotword {word[:40]!r} contains {special!r}, a special token of the model's tokenizer; "
                "hotwords must be plain words or names"
            )
        if len(word) > MAX_HOTWORD_CHARS:
            raise InvalidOptionError(
                f"hotword {word[:20]!r}... is {len(word)} characters; keep each hotword under {MAX_HOTWORD_CHARS}"
            )
        out.append(word)
    if len(out) > MAX_HOTWORDS:
        raise InvalidOptionError(f"{len(out)} hotwords given; at most {MAX_HOTWORDS} are accepted")
    return out


@dataclass(frozen=True)
class PromptIds:
    prefix: list[int]  # tokens before the audio rows
    suffix: list[int]  # tokens after the audio rows


class PromptTokenizer:
    """The Qwen3 tokenizer of the checkpoint (`Qwen3-0.6B/tokenizer.json`)."""

    def __init__(self, tokenizer_file: Path):
        try:
            self.tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise ModelLoadError(f"cannot read the tokenizer {tokenizer_file}: {exc}; re-download the model") from exc
        self.im_end = self._special("<|im_end|>")
        self.endoftext = self._special("<|endoftext|>")
        # every added token (<|im_start|>, <think>, <tool_call>, ...): encoded as one control token wherever it occurs
        self.special_tokens = frozenset(t.content for t in self.tok.get_added_tokens_decoder().values())

    def _special(self, text: str) -> int:
        tid = self.tok.token_to_id(text)
        if tid is None:
            raise ModelLoadError(f"the tokenizer lacks the special token {text}; is this a Qwen3 tokenizer?")
        return tid

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, instruction_text: str) -> PromptIds:
        pieces = _SPEECH_SPLIT.split(chatml(instruction_text))
        before, _speech, after = pieces
        return PromptIds(prefix=self.encode(before), suffix=self.encode(after))


def clean_text(response: str) -> str:
    """The reference's cleanup of the decoded response (ref: inference_llm)."""
    return re.sub(r"\s+", " ", response.replace("/sil", " "))
