"""Language codes and names: Whisper's languages, by ISO-639-1 code (or Whisper's own) and English name.

Adapters check and translate `language` with them; the renderer names a transcript's language with them.
"""

from __future__ import annotations

import re

# Whisper's languages (openai/whisper tokenizer.py), ISO-639-1 code (or Whisper's own) -> English name.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian",
    "kn": "kannada", "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque",
    "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian", "bs": "bosnian",
    "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi",
    "si": "sinhala", "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese", "ht": "haitian creole",
    "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit",
    "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
    "jv": "javanese", "iw": "hebrew", "nb": "norwegian", "fil": "tagalog",  # other spellings of Whisper's
}  # fmt: skip


def language_name(language: str | None) -> str:
    """OpenAI's spelling of a language: a lowercase English name ("english"). Codes ("en", "pt-BR")
    map through Whisper's table; names pass through lowercased; unknown (None) is "english"."""
    if not language or not language.strip():
        return "english"
    lang = language.strip().lower()
    return LANGUAGES.get(lang) or LANGUAGES.get(re.split(r"[-_]", lang)[0]) or lang


WHISPER_ALIASES = {"iw": "he", "jv": "jw", "nb": "no", "fil": "tl"}
WHISPER_LANGUAGES = frozenset(LANGUAGES) - frozenset(WHISPER_ALIASES)
"""Whisper's own language codes (openai/whisper tokenizer.LANGUAGES), the values its `language` takes."""


def whisper_code(language: str) -> str | None:
    """Whisper's code for an ISO-639-1 code or tag ("pt-BR" -> "pt", "iw" -> "he"); None for one it lacks."""
    code = re.split(r"[-_]", language.strip().lower())[0]
    code = WHISPER_ALIASES.get(code, code)
    return code if code in WHISPER_LANGUAGES else None
