"""An offline CLIP tokenizer built from the BPE vocabulary shipped in engine/data.

Stable Diffusion 1.x uses OpenAI CLIP's tokenizer. Its vocabulary and merges are regenerated here from
OpenAI's BPE file (byte-identical to the vocab.json/merges.txt of openai/clip-vit-large-patch14), so
nothing is fetched from a hub.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path
from types import SimpleNamespace

from ..compat import transformers_major

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
    import transformers

    vocab, merges = clip_vocab_and_merges()
    options = dict(model_max_length=MAX_LENGTH, bos_token=START_TOKEN, eos_token=END_TOKEN,
                   unk_token=END_TOKEN, pad_token=pad_token)
    if transformers_major() >= 5:
        # transformers 5's CLIPTokenizer is the fast one and takes the vocabulary in memory (it ignores files).
        return transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **options)
    # transformers 4's tokenizers read files; its own converter builds the fast one from the tables in memory (it reads
    # only these fields of the Python tokenizer it normally converts). clean_up_tokenization_spaces only shapes
    # decoding: False is transformers 5's default, and 4 warns when it is unset.
    from transformers.convert_slow_tokenizer import CLIPConverter

    tables = SimpleNamespace(encoder=vocab, bpe_ranks=dict.fromkeys(merges), unk_token=END_TOKEN,
                             bos_token=START_TOKEN, bos_token_id=START_TOKEN_ID, eos_token=END_TOKEN,
                             eos_token_id=END_TOKEN_ID)
    return transformers.CLIPTokenizerFast(tokenizer_object=CLIPConverter(tables).converted(),
                                          clean_up_tokenization_spaces=False, **options)
