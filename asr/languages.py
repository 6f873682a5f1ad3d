"""Languages per model variant, and how a caller's spelling maps to the prompt's language name.

The official code inserts the `language` string verbatim into the prompt (`语音转写成{language}：`,
funasr/models/fun_asr_nano/model.py::get_prompt), and the model was trained on Chinese names.
"""

from __future__ import annotations

from .errors import UnsupportedLanguageError
from .types import Language

Variant = str  # "nano" | "mlt"

_NANO = [
    Language(code="zh", name="Chinese (Mandarin)", prompt_name="中文"),
    Language(code="en", name="English", prompt_name="英文"),
    Language(code="ja", name="Japanese", prompt_name="日文"),
]
_NANO_DIALECTS = [
    # Nano-2512 recognises these Chinese dialects under the Chinese prompt (no separate prompt names
    # are published); accents of Mandarin need no setting at all.
    ("yue", "Cantonese"), ("wuu", "Wu (Shanghainese)"), ("nan", "Min Nan (Hokkien)"), ("hak", "Hakka"),
    ("gan", "Gan"), ("hsn", "Xiang"), ("cjy", "Jin"),
]
_NANO += [
    Language(code=c, name=n, prompt_name="中文", note="Chinese dialect: transcribed with the Chinese prompt")
    for c, n in _NANO_DIALECTS
]

_MLT_TABLE = [
    ("zh", "Chinese", "中文"), ("en", "English", "英文"), ("yue", "Cantonese", "粤语"),
    ("ja", "Japanese", "日文"), ("ko", "Korean", "韩文"), ("vi", "Vietnamese", "越南语"),
    ("id", "Indonesian", "印尼语"), ("th", "Thai", "泰语"), ("ms", "Malay", "马来语"),
    ("tl", "Filipino", "菲律宾语"), ("ar", "Arabic", "阿拉伯语"), ("hi", "Hindi", "印地语"),
    ("bg", "Bulgarian", "保加利亚语"), ("hr", "Croatian", "克罗地亚语"), ("cs", "Czech", "捷克语"),
    ("da", "Danish", "丹麦语"), ("nl", "Dutch", "荷兰语"), ("et", "Estonian", "爱沙尼亚语"),
    ("fi", "Finnish", "芬兰语"), ("el", "Greek", "希腊语"), ("hu", "Hungarian", "匈牙利语"),
    ("ga", "Irish", "爱尔兰语"), ("lv", "Latvian", "拉脱维亚语"), ("lt", "Lithuanian", "立陶宛语"),
    ("mt", "Maltese", "马耳他语"), ("pl", "Polish", "波兰语"), ("pt", "Portuguese", "葡萄牙语"),
    ("ro", "Romanian", "罗马尼亚语"), ("sk", "Slovak", "斯洛伐克语"), ("sl", "Slovenian", "斯洛文尼亚语"),
    ("sv", "Swedish", "瑞典语"),
]
_MLT = [Language(code=c, name=n, prompt_name=p) for c, n, p in _MLT_TABLE]

_ALIASES = {"fil": "tl", "cmn": "zh", "zh-cn": "zh", "zh-hans": "zh", "zh-tw": "zh", "zh-hant": "zh",
            "jp": "ja", "kr": "ko", "in": "id", "iw": "he"}

AUTO = ("auto", "", "none", "detect")


def languages(variant: Variant) -> list[Language]:
    """The languages the given variant ("nano" or "mlt") accepts."""
    if variant not in ("nano", "mlt"):
        raise ValueError(f"unknown variant {variant!r}")
    return list(_MLT if variant == "mlt" else _NANO)


def resolve(language: str | None, variant: Variant) -> Language | None:
    """Map a caller's spelling (ISO code, English name, prompt name, 'auto') to a Language.

    Returns None for automatic detection (no language clause in the prompt).
    """
    if language is None:
        return None
    key = language.strip()
    if key.lower() in AUTO:
        return None
    table = languages(variant)
    low = _ALIASES.get(key.lower(), key.lower())
    for lang in table:
        if low == lang.code or low == lang.name.lower() or key == lang.prompt_name:
            return lang
        if low.split(" ")[0] == lang.name.lower().split(" ")[0]:
            return lang
    valid = [f"{lg.code} ({lg.name}, {lg.prompt_name})" for lg in table]
    raise UnsupportedLanguageError(
        f"language {language!r} is not supported by the {variant_label(variant)} model; use 'auto' or one of: "
        + ", ".join(valid),
        valid=[lg.code for lg in table],
    )


def variant_label(variant: Variant) -> str:
    return {"nano": "Fun-ASR-Nano-2512", "mlt": "Fun-ASR-MLT-Nano-2512"}[variant]


def detect_from_text(text: str, variant: Variant) -> str | None:
    """Guess the language of a transcript from its script ('script-heuristic').

    Kana -> ja, Hangul -> ko, Han -> zh, Thai -> th, Arabic -> ar, Devanagari -> hi, Greek -> el,
    Cyrillic -> bg (MLT only); Latin script -> en for Nano (its only Latin language), None for MLT
    (many Latin-script languages, not distinguishable by script).
    """
    counts = {"kana": 0, "hangul": 0, "han": 0, "thai": 0, "arabic": 0, "deva": 0, "greek": 0, "cyr": 0,
              "latin": 0}
    for ch in text:
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF:
            counts["kana"] += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF:
            counts["hangul"] += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
            counts["han"] += 1
        elif 0x0E00 <= o <= 0x0E7F:
            counts["thai"] += 1
        elif 0x0600 <= o <= 0x06FF:
            counts["arabic"] += 1
        elif 0x0900 <= o <= 0x097F:
            counts["deva"] += 1
        elif 0x0370 <= o <= 0x03FF:
            counts["greek"] += 1
        elif 0x0400 <= o <= 0x04FF:
            counts["cyr"] += 1
        elif ch.isalpha() and o < 0x250:
            counts["latin"] += 1
    if sum(counts.values()) == 0:
        return None
    if counts["kana"] > 0 and counts["kana"] * 4 >= counts["han"] * 1:
        return "ja"
    best = max(counts, key=lambda k: counts[k])
    mapping = {"hangul": "ko", "han": "zh", "thai": "th", "arabic": "ar", "deva": "hi", "greek": "el",
               "cyr": "bg", "kana": "ja"}
    if best == "latin":
        return "en" if variant == "nano" else None
    code = mapping[best]
    valid = {lg.code for lg in languages(variant)}
    return code if code in valid else None
