"""The one normalisation of model and untrusted text, its word splitter, and the shipped word lists.

    normalise("ＯＢＳＩＤＩＡＮ\u200b–31") == "obsidian-31"     # NFKC, case-folded, zero-width gone
    words("Le thriller de l'année") == ["le", "thriller", "de", "l", "année"]
    wordlist("function_words")                                  # agent/wordlists/function_words.txt

Every check on model text (copy validator, text guard, the reranker's prompt-echo check) compares
normalised text, so look-alike tricks (full-width letters, zero-width splits, typographic dashes) do
not slip past one check while another sees through them.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

WORDLISTS = Path(__file__).resolve().parent / "wordlists"

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"), "-")
_QUOTES = dict.fromkeys(map(ord, "\u2018\u2019\u201b\u2032"), "'") | dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f"), '"')
_WORD = re.compile(r"[^\W_]+")
# Scripts written without spaces between words: each character is a word of its own.
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def bad_char(c: str) -> bool:
    """Control, format (zero-width), private-use, surrogate and line/paragraph separator characters."""
    return unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs", "Zl", "Zp")


def normalise(text: str) -> str:
    """NFKC, case-folded, format characters dropped, other bad characters and runs of space -> one space,
    typographic dashes -> "-", curly quotes -> straight ones. Newlines survive as a single "\\n"."""
    text = unicodedata.normalize("NFKC", text).translate(_DASHES).translate(_QUOTES)
    text = "".join("" if unicodedata.category(c) == "Cf" else (" " if bad_char(c) and c != "\n" else c) for c in text)
    text = re.sub(r"[^\S\n]+", " ", text.casefold())
    return re.sub(r"\s*\n\s*", "\n", text).strip()


def words(text: str) -> list[str]:
    """The words of normalised `text`: runs of letters and digits; hyphens and apostrophes split words."""
    out: list[str] = []
    for w in _WORD.findall(normalise(text)):
        out.extend(_UNSPACED.sub(lambda m: f" {m.group(0)} ", w).split() if _UNSPACED.search(w) else (w,))
    return out


def stem(word: str) -> str:
    """A light English plural fold ("shoes" -> "shoe", "berries" -> "berry"), so a word and its plural match."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@lru_cache(maxsize=None)
def wordlist(name: str) -> tuple[str, ...]:
    """The non-comment lines of agent/wordlists/<name>.txt ('#' starts a comment line), read once."""
    lines = (WORDLISTS / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


@lru_cache(maxsize=None)
def wordset(*names: str) -> frozenset[str]:
    """The whitespace-separated entries of the named word lists, as one set (read once)."""
    return frozenset(w for name in names for line in wordlist(name) for w in line.split())
