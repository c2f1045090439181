"""New trigger tokens: name checks, prompt expansion, and trainable vectors spliced into a text encoder.

A token with n vectors is written `tok` in prompts and expands to `tok tok_1 … tok_{n-1}`, the
convention of diffusers' textual inversion, so files we write load with `load_textual_inversion`.
The vectors live in their own parameters next to the frozen embedding table: training them cannot
change any other row, and each object's vectors get gradients only from prompts that name it.
"""
from __future__ import annotations

import contextlib
import copy
import re

import torch
from torch import nn

from ..compat import set_token_table, token_table
from ..errors import InputError

_TOKEN_CHARS = re.compile(r"^[a-z0-9_<>\-]+$")


def vector_names(token: str, n_vectors: int) -> list[str]:
    """The tokenizer entries of a token with n vectors (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n_vectors)]


def _is_vocabulary_word(tokenizer, word: str) -> bool:
    vocab = tokenizer.get_vocab()
    return f"{word}</w>" in vocab or word in vocab


# A prompt holds 75 pieces between its start and end tokens; a class word must leave room for the rest of it.
MAX_CLASS_PIECES = 32


def check_objects(tokenizer, tokens: list[str], class_words: list[str]) -> tuple[list[str], list[str]]:
    """Validate trigger tokens and class words; returns them normalised (lower case, trimmed)."""
    if len(tokens) != len(class_words):
        raise InputError(f"got {len(tokens)} token name(s) but {len(class_words)} class word(s); give one of each per object.")
    if not tokens:
        raise InputError("no object given; name at least one token and its class word (e.g. token 'zqcat', class 'cat').")
    tokens = [t.strip().lower() for t in tokens]
    class_words = [c.strip().lower() for c in class_words]
    for token, class_word in zip(tokens, class_words):
        if not token:
            raise InputError("a token name is empty; use a made-up word such as 'zqcat'.")
        if not _TOKEN_CHARS.match(token):
            raise InputError(f"token {token!r} may only contain letters, digits, '_', '-', '<' and '>' (no spaces).")
        if _is_vocabulary_word(tokenizer, token) or token in tokenizer.get_added_vocab():
            raise InputError(
                f"token {token!r} is already a word the text encoder knows; pick a made-up word such as 'zq{token}'."
            )
        pieces = len(tokenizer(class_word, add_special_tokens=False).input_ids)
        if not pieces:
            raise InputError(f"class word {class_word!r} for token {token!r} tokenises to nothing; use a plain noun such as 'cat'.")
        if pieces > MAX_CLASS_PIECES:
            raise InputError(f"class word {class_word[:40]!r}... for token {token!r} is {pieces} text pieces; a prompt "
                             f"holds 75, so it would be cut off: use a short noun such as 'cat' (at most "
                             f"{MAX_CLASS_PIECES} pieces).")
        if class_word == token:
            raise InputError(f"token {token!r} equals its class word; the token must be a new word.")
    for i, first in enumerate(tokens):
        for second in tokens[i + 1 :]:
            if first in second or second in first:
                raise InputError(
                    f"token names {first!r} and {second!r} overlap; use names that do not contain each other "
                    "(prompt expansion works on whole names)."
                )
    return tokens, class_words


def class_word_vectors(text_encoder, tokenizer, class_word: str, n_vectors: int) -> torch.Tensor:
    """Initial vectors from a class word's token embeddings (repeated if the word has fewer pieces)."""
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    table = text_encoder.get_input_embeddings().weight.detach()
    picked = [ids[i % len(ids)] for i in range(n_vectors)]
    return table[picked].float().cpu().clone()


def vocabulary_norm(text_encoder) -> float:
    """Mean L2 norm of the rows of the token-embedding table (the scale a token vector should keep)."""
    return float(text_encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean())


def nearest_words(text_encoder, tokenizer, vector: torch.Tensor, k: int = 5) -> list[str]:
    """The k vocabulary words whose embeddings are most cosine-similar to `vector`."""
    table = text_encoder.get_input_embeddings().weight.detach().float()
    scores = torch.nn.functional.cosine_similarity(table, vector.float().to(table.device)[None], dim=1)
    ids = scores.topk(k).indices.tolist()
    return [tokenizer.decode([i]).strip() for i in ids]


def eos_pooled(hidden_states_of, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """CLIP's pooled text state: the hidden state at each prompt's first end token, where hidden_states_of(ids)
    runs the text model and returns its last hidden states [batch, positions, width].

    CLIP's text model is causal, so nothing after a prompt's end token changes the states before it: the ids are
    cut after the longest prompt's end, which saves most of a 77-token pass (a short prompt's pass at SD1.5 size
    took a quarter of the time). Pooled here rather than by transformers: with the legacy config value
    eos_token_id=2 (SD1.5's text encoder has it) transformers pools at the largest id, which is a new token's once
    tokens are added.
    """
    ends = input_ids == eos_token_id
    positions = ends.int().argmax(dim=-1)
    if ends.any(dim=-1).all():
        input_ids = input_ids[:, : int(positions.max()) + 1]
    states = hidden_states_of(input_ids)
    return states[torch.arange(states.shape[0], device=states.device), positions.to(states.device)]


class _EmbeddingWithNewRows(nn.Module):
    """A token-embedding layer: ids below `offset` read the frozen table, the rest read `vectors`."""

    def __init__(self, base: nn.Embedding, offset: int, vectors: nn.ParameterList):
        super().__init__()
        self.base = base
        self.offset = offset
        self.vectors = vectors

    @property
    def weight(self):  # transformers reads the table's dtype/device through .weight
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.offset
        out = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        if not bool(is_new.any()):
            return out
        table = torch.cat(list(self.vectors)).to(device=out.device, dtype=out.dtype)
        new = table[(ids - self.offset).clamp(min=0, max=table.shape[0] - 1)]
        return torch.where(is_new[..., None], new, out)


class ConceptVocabulary:
    """The new tokens of one training run: a private tokenizer copy that knows them, and their vectors."""

    def __init__(self, tokenizer, tokens: list[str], vectors: list[torch.Tensor]):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.offset = len(self.tokenizer)
        self.tokens = list(tokens)
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().float().clone()) for v in vectors])
        names = [vector_names(token, v.shape[0]) for token, v in zip(tokens, vectors)]
        self.tokenizer.add_tokens([name for own in names for name in own])
        # Per token, the tokenizer ids of its vectors (where it stands in an encoded prompt).
        self.token_ids = [torch.tensor(self.tokenizer.convert_tokens_to_ids(own)) for own in names]
        self._pattern = re.compile(r"(?<![\w<>-])(" + "|".join(re.escape(t) for t in tokens) + r")(?![\w<>-])")
        self._expansion = {t: " ".join(own) for t, own in zip(tokens, names)}

    def expand(self, prompt: str) -> str:
        """'a zqcat cat' → 'a zqcat zqcat_1 cat' for multi-vector tokens."""
        return self._pattern.sub(lambda m: self._expansion[m.group(1)], prompt.lower())

    def input_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            [self.expand(p) for p in prompts],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @contextlib.contextmanager
    def installed(self, text_encoder):
        """Splice the vectors into `text_encoder` for the duration of the block; the table is never touched."""
        embeddings = token_table(text_encoder)
        set_token_table(text_encoder, _EmbeddingWithNewRows(embeddings, self.offset, self.vectors))
        try:
            yield self
        finally:
            set_token_table(text_encoder, embeddings)

    def clamp_norms(self, max_norms: list[float], indices=None) -> None:
        """Keep the vectors of the given objects (default all) at most their bound long (no drift to huge norms)."""
        with torch.no_grad():
            for index in range(len(self.vectors)) if indices is None else indices:
                vectors, bound = self.vectors[index], max_norms[index]
                norms = vectors.norm(dim=1, keepdim=True)
                too_long = norms > bound  # rows within the bound stay bit-identical
                vectors.copy_(torch.where(too_long, vectors * (bound / norms.clamp(min=1e-12)), vectors))
