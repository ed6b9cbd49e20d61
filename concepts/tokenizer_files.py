"""Write a small CLIP BPE tokenizer (vocab.json, merges.txt) learned from a fixed word list.

The files have exactly the format of openai/clip-vit-large-patch14's tokenizer: 256 byte symbols,
the same with ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# Words of the captions the tests, the demo and the merge's regularization set use, plus the
# reference's rare initializer words, so each of those is a single token as in CLIP's real vocab.
WORDS = """
a an the of in on at with and by to for from under over near behind beside next inside outside
photo picture painting drawing sketch render image close up zoomed far away very small large big
tiny little old new red orange yellow green cyan blue purple pink brown black white gray grey gold
silver dark light bright striped solid two tone ring square circle triangle star dog cat car chair
table cup mug vase lamp house tree flower bird horse person man woman child toy teddy bear bag shoe
hat guitar clock book bottle bicycle boat mountain river lake beach forest city street garden room
kitchen field sky snow sand grass water background style art sculpture wooden metal glass plastic
stone paper sitting standing lying running jumping floating top bottom half left right side front
back view portrait landscape scene studio shot high quality detailed sunny rainy night day morning
evening sunset sunrise autumn winter spring summer ktn pll ucd sks vxz qrt
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte to printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair (ties broken lexically) until every word is one symbol."""
    byte_map = bytes_to_unicode()
    corpus = Counter()
    for w in words:
        chars = [byte_map[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        corpus[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for symbols, count in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged


def write_clip_tokenizer_files(directory: Path, words: list[str] = WORDS) -> int:
    """Write vocab.json and merges.txt; return the vocabulary size."""
    byte_symbols = list(bytes_to_unicode().values())
    merges = learn_merges(sorted(set(words)))
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)
