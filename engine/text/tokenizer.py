"""An offline CLIP tokenizer built from the BPE vocabulary shipped in engine/data.

Stable Diffusion 1.x uses OpenAI CLIP's tokenizer. Its vocabulary and merges are regenerated here from
OpenAI's BPE file (byte-identical to the vocab.json/merges.txt of openai/clip-vit-large-patch14), so
nothing is fetched from a hub.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

BPE_PATH = Path(__file__).parents[1] / "data" / "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
START_TOKEN_ID, END_TOKEN_ID = 49406, 49407
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The 49,408-entry vocabulary and the 48,894 merges of CLIP's tokenizer."""
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = END_TOKEN):
    """A fresh transformers CLIPTokenizer (callers may add tokens to it), padded to 77 tokens.

    Each family pads as its record says (families.py): SD1 with the end token, SD2 with "!" (id 0).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5 ignores vocab_file=/merges_file=; the in-memory vocab= and merges= are honoured.
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=MAX_LENGTH,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        unk_token=END_TOKEN,
        pad_token=pad_token,
    )
