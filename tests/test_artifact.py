import pytest
import torch

from concepts.apply import apply_concepts
from concepts.artifact import Concept, LinearDelta, concept_from_bytes, concept_to_bytes
from concepts.base import load_base
from concepts.errors import BaseMismatch, CorruptArtifact, InvalidArgument, NotFound
from concepts.store import ArtifactStore
from tests.conftest import random_concept


def _assert_same(a: Concept, b: Concept) -> None:
    assert a.tokens == b.tokens and a.class_words == b.class_words
    assert a.base_fingerprint == b.base_fingerprint and a.provenance == b.provenance
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.deltas.keys() == b.deltas.keys()
    for name in a.deltas:
        for part in ("dense", "up", "down"):
            x, y = getattr(a.deltas[name], part), getattr(b.deltas[name], part)
            assert (x is None and y is None) or (torch.equal(x, y) and x.dtype == y.dtype)


@pytest.mark.parametrize("rank", [None, 2])
def test_round_trip_through_store_is_identical(tmp_path, tiny_base, rank):
    concept = random_concept(tiny_base, seed=3, rank=rank)
    store = ArtifactStore(str(tmp_path / "store"))
    digest = store.put_concept(concept)
    assert store.put_concept(concept) == digest  # same bytes, same address
    _assert_same(concept, store.get_concept(digest))
    assert concept_to_bytes(store.get_concept(digest)) == store.get(digest)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # nothing half-written left behind


def test_fp16_factors_keep_their_dtype(tiny_base):
    concept = random_concept(tiny_base, seed=4, rank=3)
    half = Concept({n: LinearDelta(up=d.up.half(), down=d.down.half()) for n, d in concept.deltas.items()},
                   concept.tokens, concept.embeddings, concept.base_fingerprint)
    back = concept_from_bytes(concept_to_bytes(half))
    assert all(d.up.dtype == torch.float16 for d in back.deltas.values())
    assert back.nbytes < concept.nbytes


def test_truncated_artifact_names_its_digest_and_logs_its_path(tmp_path, tiny_base, caplog):
    store = ArtifactStore(str(tmp_path))
    digest = store.put_concept(random_concept(tiny_base, seed=5))
    path = tmp_path / "sha256" / digest
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptArtifact) as e:
        store.get_concept(digest)
    assert f"sha256:{digest}" in str(e.value) and str(tmp_path) not in str(e.value)
    assert str(path) in caplog.text  # operators find the file in the log


def test_tampered_artifact_is_refused(tmp_path, tiny_base):
    store = ArtifactStore(str(tmp_path))
    digest = store.put_concept(random_concept(tiny_base, seed=6))
    path = tmp_path / "sha256" / digest
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match=f"sha256:{digest} in the artifact store does not match its address"):
        store.get_concept(digest)


def test_unparseable_bytes_name_their_source():
    with pytest.raises(CorruptArtifact, match="upload.safetensors: truncated safetensors header"):
        concept_from_bytes(b"\xff" * 64, source="upload.safetensors")


def test_missing_and_malformed_digests(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(NotFound, match="no blob sha256:"):
        store.get("0" * 64)
    with pytest.raises(InvalidArgument, match="digest: expected 64 hex characters"):
        store.get("../../etc/passwd")


def test_artifact_for_another_base_names_both_fingerprints(tiny_base, other_base_dir):
    other = load_base(other_base_dir)
    concept = random_concept(other, seed=7)
    with pytest.raises(BaseMismatch) as e:
        apply_concepts(tiny_base.unet, tiny_base.text_encoder, tiny_base.tokenizer, [concept])
    assert other.fingerprint in str(e.value) and tiny_base.fingerprint in str(e.value)


def test_existing_token_is_refused(tiny_base):
    concept = random_concept(tiny_base, seed=8, token="dog</w>")
    with pytest.raises(InvalidArgument, match="already exist"):
        apply_concepts(tiny_base.unet, tiny_base.text_encoder, tiny_base.tokenizer, [concept])
