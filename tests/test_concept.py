"""Concept files: per-object embeddings for several objects, replacing an earlier concept of the same name,
and the checks that loading makes (engine/concept/concept.py)."""
from __future__ import annotations

import json

import pytest
import torch

from protobooth.engine.concept.concept import (METADATA_KEY, Concept, ConceptObject, concept_files, load_concept,
                                       read_concept_metadata, save_concept)
from protobooth.engine.errors import InputError
from protobooth.engine.fileio import save_safetensors


def make_concept(tokens=("zqcat", "zqpot"), rows=(2, 1), lora=True, family="sd1") -> Concept:
    generator = torch.Generator().manual_seed(len(tokens))
    objects = [ConceptObject(t, f"class{i}", torch.randn(n, 32, generator=generator)) for i, (t, n) in enumerate(zip(tokens, rows))]
    weights = {"lora_unet_a.lora_down.weight": torch.randn(4, 32, generator=generator),
               "lora_unet_a.lora_up.weight": torch.randn(32, 4, generator=generator), "lora_unet_a.alpha": torch.tensor(4.0)}
    return Concept(objects, weights if lora else {}, family, "ab" * 8)


def paths(root, name="mine"):
    return root / "loras" / f"{name}.safetensors", root / "embeddings" / f"{name}.safetensors"


def test_several_objects_also_get_one_embedding_file_each(tmp_path):
    from safetensors.torch import load_file

    concept = make_concept()
    lora, embedding = paths(tmp_path)
    save_concept(concept, lora, embedding)
    cat, pot = tmp_path / "embeddings" / "mine_zqcat.safetensors", tmp_path / "embeddings" / "mine_zqpot.safetensors"
    assert concept_files(lora, embedding, concept.tokens) == [lora, embedding, cat, pot]
    assert sorted(p.name for p in embedding.parent.iterdir()) == ["mine.safetensors", "mine_zqcat.safetensors",
                                                                  "mine_zqpot.safetensors"]
    assert torch.equal(load_file(str(cat))["clip_l"], concept.objects[0].vectors)
    assert torch.equal(load_file(str(pot))["clip_l"], concept.objects[1].vectors)
    assert torch.equal(load_file(str(embedding))["clip_l"], torch.cat([o.vectors for o in concept.objects]))
    # They are parts, not concepts: concept lists (Load Concept) leave them out, and loading one says what it is.
    assert read_concept_metadata(cat) is None and read_concept_metadata(embedding) is not None
    with pytest.raises(InputError, match="holds one object \\(zqcat\\) of concept 'mine'"):
        load_concept(cat)


def test_a_per_object_file_loads_in_diffusers_as_that_object(tmp_path):
    from protobooth.engine.models import tiny

    concept = make_concept()
    lora, embedding = paths(tmp_path)
    save_concept(concept, lora, embedding)
    pipeline = tiny.tiny_model(0).pipeline()
    pipeline.load_textual_inversion(str(tmp_path / "embeddings" / "mine_zqcat.safetensors"), token="zqcat")
    ids = pipeline.tokenizer.convert_tokens_to_ids(["zqcat", "zqcat_1"])
    table = pipeline.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], concept.objects[0].vectors)


def test_one_object_gets_no_extra_file(tmp_path):
    concept = make_concept(tokens=("zqcat",), rows=(1,))
    lora, embedding = paths(tmp_path)
    save_concept(concept, lora, embedding)
    assert concept_files(lora, embedding, concept.tokens) == [lora, embedding]
    assert [p.name for p in embedding.parent.iterdir()] == ["mine.safetensors"]


def test_saving_again_replaces_what_the_earlier_concept_of_that_name_left(tmp_path):
    lora, embedding = paths(tmp_path)
    save_concept(make_concept(), lora, embedding)
    save_concept(make_concept(tokens=("zqdog", "zqhat"), lora=False), lora, embedding)
    assert not lora.exists()  # the earlier concept's LoRA would otherwise be loaded with this one
    assert sorted(p.name for p in embedding.parent.iterdir()) == ["mine.safetensors", "mine_zqdog.safetensors",
                                                                  "mine_zqhat.safetensors"]
    assert load_concept(embedding, None).tokens == ["zqdog", "zqhat"]


def test_a_per_object_file_never_replaces_another_concept(tmp_path):
    other_lora, other = paths(tmp_path, "mine_zqcat")
    save_concept(make_concept(tokens=("zqother",), rows=(1,)), other_lora, other)
    before = other.read_bytes()
    lora, embedding = paths(tmp_path)
    with pytest.raises(InputError, match="mine_zqcat.safetensors is another saved concept"):
        save_concept(make_concept(), lora, embedding)
    assert other.read_bytes() == before and not embedding.exists() and not lora.exists()


def test_loading_checks_that_the_lora_belongs_to_the_concept(tmp_path):
    lora, embedding = paths(tmp_path)
    save_concept(make_concept(), lora, embedding)
    assert load_concept(embedding, lora).lora  # the pair saved together loads

    other_lora, other_embedding = paths(tmp_path, "other")
    save_concept(make_concept(tokens=("zqdog", "zqhat")), other_lora, other_embedding)
    with pytest.raises(InputError, match="other.safetensors does not belong to the concept in .*mine.safetensors"):
        load_concept(embedding, other_lora)
    plain = tmp_path / "plain.safetensors"  # somebody's LoRA without ProtoBooth's metadata
    save_safetensors(make_concept().lora, plain)
    with pytest.raises(InputError, match="plain.safetensors does not belong"):
        load_concept(embedding, plain)
    with pytest.raises(InputError, match="saved with a LoRA, but its LoRA file is missing"):
        load_concept(embedding, None)


def _damaged(tmp_path, tensors=None, **changes):
    meta = make_concept().metadata()
    meta.update(changes)
    path = tmp_path / "damaged.safetensors"
    save_safetensors(tensors or {"clip_l": torch.zeros(3, 32)}, path, metadata={METADATA_KEY: json.dumps(meta)})
    return path


@pytest.mark.parametrize(
    "tensors, changes, message",
    [
        (None, dict(family="sd3"), "model family 'sd3', which this version of ProtoBooth cannot use"),
        (None, dict(family="sdxl"), "has no \\[rows, width\\] 'clip_g' tensor"),  # an SDXL file with one half
        ({"clip_g": torch.zeros(3, 32)}, {}, "has no \\[rows, width\\] 'clip_l' tensor"),
        ({"clip_l": torch.zeros(96)}, {}, "has no \\[rows, width\\] 'clip_l' tensor"),
        (None, dict(objects=[{"token": "zqcat", "class_word": "cat", "rows": [0, 5]}]),
         "object 'zqcat' names rows \\[0, 5\\] but the file holds 3 row\\(s\\)"),
        (None, dict(objects=[{"token": "zqcat", "class_word": "cat", "rows": [2, 2]}]), "names rows \\[2, 2\\]"),
        (None, dict(objects=[{"token": "zqcat", "class_word": "cat", "rows": [-1, 2]}]), "names rows \\[-1, 2\\]"),
        (None, dict(objects=[]), "names no objects"),
    ],
)
def test_a_damaged_or_foreign_embedding_is_refused_with_what_is_wrong(tmp_path, tensors, changes, message):
    with pytest.raises(InputError, match=message):
        load_concept(_damaged(tmp_path, tensors, lora=False, **changes))
