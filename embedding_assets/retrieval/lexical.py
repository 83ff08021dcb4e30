"""Lexical signals that survive how customers type: script folding, character n-grams, lemmas.

- `to_cyrillic` / `with_cyrillic_names`: Latin product names read in Cyrillic ("MORE" -> "море"),
  for the text a dense model embeds.
- `fold_script`: one Latin spelling for both scripts ("Форсаж" and "forsazh" -> "forsaz"), so that
  lexical matching does not care which script or case a name was typed in.
- `CharNgramIndex`: TF-IDF cosine over character 3-5-grams of folded words; tolerant to typos.
- `LemmaIndex`: BM25 over `pymorphy3` lemmas (function words dropped), Latin words read in Cyrillic.
- `scaled` and `weighted_sum`: put scores of different kinds on one scale and fuse them.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_LATIN_WORD = re.compile(r"\b[A-Za-z][A-Za-z/.\-]*[A-Za-z]\b|\b[A-Za-z]\b")
_HAS_LATIN = re.compile(r"[A-Za-z]")

_LATIN_TO_CYRILLIC_DIGRAPHS = (
    ("shch", "щ"), ("sch", "щ"), ("zh", "ж"), ("kh", "х"), ("ch", "ч"), ("sh", "ш"), ("ts", "ц"),
    ("yu", "ю"), ("ya", "я"), ("yo", "ё"), ("ph", "ф"), ("th", "т"), ("ck", "к"),
)
_LATIN_TO_CYRILLIC = str.maketrans({
    "a": "а", "b": "б", "c": "к", "d": "д", "e": "е", "f": "ф", "g": "г", "h": "х", "i": "и", "j": "дж",
    "k": "к", "l": "л", "m": "м", "n": "н", "o": "о", "p": "п", "q": "к", "r": "р", "s": "с", "t": "т",
    "u": "у", "v": "в", "w": "в", "x": "кс", "y": "й", "z": "з",
})
_CYRILLIC_TO_LATIN = str.maketrans({
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "z", "з": "z", "и": "i",
    "й": "i", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r", "с": "s", "т": "t",
    "у": "u", "ф": "f", "х": "h", "ц": "c", "ч": "c", "ш": "s", "щ": "s", "ъ": "", "ы": "i", "ь": "",
    "э": "e", "ю": "u", "я": "a", "і": "i", "ў": "u",
})
# Latin spellings of one sound collapse to the letter the Cyrillic table gives it.
_LATIN_FOLDS = (
    ("shch", "s"), ("sch", "s"), ("zh", "z"), ("kh", "h"), ("ch", "c"), ("sh", "s"), ("ts", "c"),
    ("yu", "u"), ("ya", "a"), ("yo", "e"), ("ph", "f"), ("ck", "k"), ("x", "ks"), ("q", "k"),
    ("w", "v"), ("y", "i"), ("j", "i"),
)
_REPEATS = re.compile(r"(.)\1+")
_HARD_C = re.compile(r"c(?=[aouklrt]|$)")


def to_cyrillic(word: str) -> str:
    """A Latin word as a Russian reader would spell it: "MORE" -> "море", "Forsazh" -> "форсаж"."""
    text = word.lower()
    for latin, cyrillic in _LATIN_TO_CYRILLIC_DIGRAPHS:
        text = text.replace(latin, cyrillic)
    return text.translate(_LATIN_TO_CYRILLIC)


def with_cyrillic_names(text: str) -> str:
    """The text with each Latin name followed by its Cyrillic reading: "карта MORE" -> "карта MORE (море)"."""
    def add_reading(match: re.Match) -> str:
        name = match.group(0)
        reading = to_cyrillic(re.sub(r"[/.\-]", "", name))
        return f"{name} ({reading})"

    return _LATIN_WORD.sub(add_reading, text)


def cyrillic_query(text: str) -> str:
    """A query with its Latin words also in Cyrillic; unchanged when it has no Latin letter."""
    return with_cyrillic_names(text) if _HAS_LATIN.search(text) else text


def fold_word(word: str) -> str:
    """One Latin spelling of a word whatever its script, case or doubled letters."""
    text = word.lower()
    if _HAS_LATIN.search(text):
        for spelling, folded in _LATIN_FOLDS:
            text = text.replace(spelling, folded)
        text = _HARD_C.sub("k", text)
    else:
        text = text.translate(_CYRILLIC_TO_LATIN)
    return _REPEATS.sub(r"\1", text)


def words(text: str) -> list[str]:
    """Lowercased words; "PLAT/ON" and "e-pos" stay one word each."""
    return _WORD.findall(re.sub(r"(?<=[A-Za-z])[/\-](?=[A-Za-z])", "", text).lower().replace("ё", "е"))


def fold_script(text: str) -> str:
    """The text's words folded to one Latin spelling each, joined by spaces."""
    return " ".join(fold_word(w) for w in words(text))


def _ngrams(word: str, sizes: range) -> Iterable[str]:
    padded = f" {word} "
    for n in sizes:
        if len(padded) < n:
            continue
        for start in range(len(padded) - n + 1):
            yield padded[start:start + n]


class CharNgramIndex:
    """TF-IDF cosine similarity over character n-grams of (optionally script-folded) words.

    A document's weight of n-gram g is (1 + ln count) * idf(g), idf(g) = ln((1 + N) / (1 + df)) + 1,
    L2-normalised. Built with numpy from each distinct word's n-grams, so building costs about one
    pass over the words rather than one per n-gram occurrence.
    """

    def __init__(self, documents: Sequence[str], sizes: tuple[int, int] = (3, 5), fold: bool = True):
        self._sizes = range(sizes[0], sizes[1] + 1)
        self._fold = fold
        self._size = len(documents)
        word_ids: dict[str, int] = {}
        token_docs: list[int] = []
        token_words: list[int] = []
        for position, document in enumerate(documents):
            ids = [word_ids.setdefault(t, len(word_ids)) for t in self._tokens(document)]
            token_words += ids
            token_docs += [position] * len(ids)
        self._grams: dict[str, int] = {}
        offsets, word_grams, word_gram_counts = [0], [], []
        for word in word_ids:
            for gram, count in Counter(_ngrams(word, self._sizes)).items():
                word_grams.append(self._grams.setdefault(gram, len(self._grams)))
                word_gram_counts.append(count)
            offsets.append(len(word_grams))
        self._postings = self._build(
            np.array(token_docs, dtype=np.int64), np.array(token_words, dtype=np.int64), len(word_ids),
            np.array(offsets, dtype=np.int64), np.array(word_grams, dtype=np.int64),
            np.array(word_gram_counts, dtype=np.float64),
        )

    def _build(self, token_docs, token_words, words_count, offsets, word_grams, word_gram_counts):
        """Per n-gram: the documents holding it and their normalised weights (a CSR over n-grams)."""
        grams_count = len(self._grams)
        pairs, pair_counts = np.unique(token_docs * max(words_count, 1) + token_words, return_counts=True)
        pair_docs, pair_words = np.divmod(pairs, max(words_count, 1))
        lengths = offsets[pair_words + 1] - offsets[pair_words]
        starts = np.repeat(offsets[pair_words] - np.cumsum(lengths) + lengths, lengths)
        entries = starts + np.arange(int(lengths.sum()))
        keys = np.repeat(pair_docs, lengths) * max(grams_count, 1) + word_grams[entries]
        cells, inverse = np.unique(keys, return_inverse=True)
        counts = np.bincount(inverse, weights=np.repeat(pair_counts, lengths) * word_gram_counts[entries])
        cell_docs, cell_grams = np.divmod(cells, max(grams_count, 1))
        frequency = np.bincount(cell_grams, minlength=grams_count)
        self._idf = np.log((1 + self._size) / (1 + frequency)) + 1.0
        weights = (1.0 + np.log(counts)) * self._idf[cell_grams]
        norms = np.sqrt(np.bincount(cell_docs, weights=weights * weights, minlength=self._size))
        weights = (weights / norms[cell_docs]).astype(np.float32)
        order = np.argsort(cell_grams, kind="stable")
        bounds = np.searchsorted(cell_grams[order], np.arange(grams_count + 1))
        return bounds, cell_docs[order], weights[order]

    def _tokens(self, text: str) -> list[str]:
        return [_folded(w) for w in words(text)] if self._fold else words(text)

    def _query_weights(self, query: str) -> dict[int, float]:
        counts = Counter(g for t in self._tokens(query) for g in _ngrams(t, self._sizes))
        known = {self._grams[g]: c for g, c in counts.items() if g in self._grams}
        vector = {g: (1.0 + math.log(c)) * float(self._idf[g]) for g, c in known.items()}
        norm = math.sqrt(sum(v * v for v in vector.values()))
        return {g: v / norm for g, v in vector.items()} if norm else {}

    def scores(self, query: str) -> np.ndarray:
        """Cosine similarity (0..1) of the query to every document."""
        result = np.zeros(self._size, dtype=np.float32)
        bounds, docs, weights = self._postings
        for gram, weight in self._query_weights(query).items():
            start, stop = bounds[gram], bounds[gram + 1]
            result[docs[start:stop]] += weight * weights[start:stop]
        return result


@lru_cache(maxsize=200_000)
def _folded(word: str) -> str:
    return fold_word(word)


_FUNCTION_WORDS = frozenset({"PREP", "CONJ", "PRCL", "INTJ", "NPRO", "PRED"})


@lru_cache(maxsize=1)
def _morph():
    import pymorphy3  # imported here: only a retriever that uses lemmas pays its load time

    return pymorphy3.MorphAnalyzer(lang="ru")


@lru_cache(maxsize=100_000)
def lemma(word: str) -> str | None:
    """The word's most likely lemma; None for a function word (preposition, conjunction, pronoun...)."""
    if _HAS_LATIN.search(word):
        word = to_cyrillic(word)
    if word.isdigit():
        return word
    parse = _morph().parse(word)[0]
    if parse.tag.POS in _FUNCTION_WORDS:
        return None
    return parse.normal_form.replace("ё", "е")


def lemmas(text: str) -> list[str]:
    """Lemmas of the text's content words, Latin words read in Cyrillic first."""
    return [lem for w in words(text) if (lem := lemma(w))]


class BM25:
    """Okapi BM25 over already tokenized documents."""

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75):
        self._size = len(documents)
        self._k1, self._b = k1, b
        lengths = np.array([len(d) for d in documents], dtype=np.float64)
        average = float(lengths.mean()) if self._size and lengths.sum() else 1.0
        self._norms = k1 * (1 - b + b * lengths / average)
        frequency = Counter(t for d in documents for t in set(d))
        self._idf = {t: math.log(1 + (self._size - df + 0.5) / (df + 0.5)) for t, df in frequency.items()}
        self._postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for position, d in enumerate(documents):
            for token, count in Counter(d).items():
                self._postings[token].append((position, count))

    def scores(self, tokens: Sequence[str]) -> np.ndarray:
        result = np.zeros(self._size, dtype=np.float64)
        for token in set(tokens):
            idf = self._idf.get(token)
            if idf is None:
                continue
            for position, count in self._postings[token]:
                result[position] += idf * count * (self._k1 + 1) / (count + self._norms[position])
        return result.astype(np.float32)


class LemmaIndex:
    """BM25 over the lemmas of each document."""

    def __init__(self, documents: Sequence[str]):
        self._bm25 = BM25([lemmas(d) for d in documents])

    def scores(self, query: str) -> np.ndarray:
        return self._bm25.scores(lemmas(query))


def scaled(scores: np.ndarray) -> np.ndarray:
    """Scores divided by the best one (all zeros stay zeros), so that 1.0 is this query's best match."""
    top = float(np.max(scores, initial=0.0))
    return scores / top if top > 0 else np.zeros_like(scores)


def weighted_sum(*terms: tuple[float, np.ndarray]) -> np.ndarray:
    """Sum of weight * scores over (weight, scores) pairs; terms with weight 0 are skipped."""
    total = None
    for weight, values in terms:
        if weight == 0.0:
            continue
        part = weight * np.asarray(values, dtype=np.float64)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("weighted_sum needs at least one term with a non-zero weight")
    return total
