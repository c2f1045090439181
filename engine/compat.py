"""What differs between the library releases ProtoBooth supports, kept in one place.

requirements.txt gives the ranges (e.g. transformers 4.44 to 5.x), and
requirements-min.txt pins the lowest ends, which `make test-min` runs the suite on.
"""
from __future__ import annotations

import functools

from torch import nn


@functools.lru_cache(maxsize=1)
def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def pretrained_dtype(dtype) -> dict:
    """The from_pretrained keyword for the weights' dtype: transformers 5 renamed torch_dtype to dtype."""
    return {"dtype" if transformers_major() >= 5 else "torch_dtype": dtype}


def token_table(text_model: nn.Module) -> nn.Embedding:
    """A CLIP text model's token embedding. CLIPModel's text tower has no get_input_embeddings under transformers 4."""
    if hasattr(text_model, "get_input_embeddings"):
        return text_model.get_input_embeddings()
    return text_model.embeddings.token_embedding


def set_token_table(text_model: nn.Module, table: nn.Module) -> None:
    if hasattr(text_model, "set_input_embeddings"):
        text_model.set_input_embeddings(table)
    else:
        text_model.embeddings.token_embedding = table


def text_tensors(text_model: nn.Module) -> dict:
    """A CLIP text model's tensors named as transformers 5 names CLIPTextModel's: without the "text_model." level
    that transformers 4 has (CLIPTextModelWithProjection's "text_projection.weight" keeps its name)."""
    return {name.removeprefix("text_model."): tensor for name, tensor in text_model.state_dict().items()}
