"""Long and adversarial inputs for the range and soak benchmarks (issue 15).

Every text is built deterministically (SHA-256 of its kind and index, no seeded Mersenne Twister)
to at least the requested number of tokens; the tokenizer then cuts it at the model's length.
"""

from __future__ import annotations

import hashlib

COMPLAINT = ("my flight was delayed four hours again, the gate agent was rude, the airline lost my bag "
             "and nobody answered the phone: worst customer service ever, never flying with them again!")
COMPLAINT_WORDS = ("delayed cancelled rude lost baggage refund terrible worst airline flight gate agent hours "
                   "waiting never again seat broken dirty late missed connection customer service awful "
                   "disappointed angry ridiculous unacceptable").split()

KINDS = ("real_long", "complaint_repeated", "complaint_vocab", "one_token", "punctuation", "long_words",
         "random_wordpieces", "digits")


def _stream(kind: str, index: int):
    """Deterministic pseudo-random integers (SHA-256 in counter mode) for building texts."""
    block = 0
    while True:
        digest = hashlib.sha256(f"{kind}/{index}/{block}".encode()).digest()
        for i in range(0, 32, 4):
            yield int.from_bytes(digest[i:i + 4], "little")
        block += 1


def make_text(kind: str, index: int, words: int, *, sentences: list[str] | None = None,
              vocab: list[str] | None = None) -> str:
    """One text of about ``words`` words of the given kind (``KINDS``)."""
    rnd = _stream(kind, index)
    if kind == "real_long":
        if not sentences:
            raise ValueError("real_long needs real sentences")
        out = []
        while sum(len(s.split()) for s in out) < words:
            out.append(sentences[next(rnd) % len(sentences)])
        return " ".join(out)
    if kind == "complaint_repeated":
        return " ".join([COMPLAINT] * (words // len(COMPLAINT.split()) + 1))
    if kind == "complaint_vocab":
        return " ".join(COMPLAINT_WORDS[next(rnd) % len(COMPLAINT_WORDS)] for _ in range(words))
    if kind == "one_token":
        return " ".join([["the", "bad", "!", "good"][index % 4]] * words)
    if kind == "punctuation":
        marks = "!?.,;:-()\"'*#@$%&"
        return " ".join(marks[next(rnd) % len(marks)] * (1 + next(rnd) % 3) for _ in range(words))
    if kind == "long_words":
        letters = "abcdefghijklmnopqrstuvwxyz"
        return " ".join("".join(letters[next(rnd) % 26] for _ in range(25 + next(rnd) % 20)) for _ in range(words // 8))
    if kind == "random_wordpieces":
        if not vocab:
            raise ValueError("random_wordpieces needs the tokenizer's vocabulary")
        return " ".join(vocab[next(rnd) % len(vocab)] for _ in range(words))
    if kind == "digits":
        return " ".join(str(next(rnd) % 10**(1 + index % 9)) for _ in range(words))
    raise ValueError(f"unknown text kind {kind!r}; known: {KINDS}")


def word_vocab(tokenizer) -> list[str]:
    """The tokenizer's whole-word entries (no sub-word markers, no special tokens)."""
    vocab = tokenizer.get_vocab()
    return sorted(w for w in vocab if w.isalpha() and not w.startswith("##") and not w.startswith("["))


def texts(n_per_kind: int, words: int, sentences: list[str], tokenizer, kinds=KINDS) -> list[tuple[str, str]]:
    """(kind, text) pairs: ``n_per_kind`` texts of each kind."""
    vocab = word_vocab(tokenizer)
    return [(k, make_text(k, i, words, sentences=sentences, vocab=vocab)) for k in kinds for i in range(n_per_kind)]
