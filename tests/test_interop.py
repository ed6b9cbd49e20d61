"""Export to diffusers' Custom Diffusion files; import from them and the original repo's checkpoints."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from safetensors.torch import load_file

from concepts.apply import apply_concepts
from concepts.artifact import Concept, concept_to_bytes, digest_of
from concepts.base import CROSSATTN_SUFFIXES, kv_layers, load_base
from concepts.errors import BaseMismatch, CorruptArtifact, InvalidArgument
from concepts.interop import WEIGHTS_NAME, export_diffusers, import_concept, ldm_block_prefixes
from concepts.store import ArtifactStore
from customdiff.__main__ import main
from tests.conftest import random_concept

PROMPT = "photo of a <new1> dog"
# The tiny base (layers_per_block=1, two down blocks) in LDM numbering: input_blocks 0 is conv_in, 2 the
# downsampler; output_blocks holds two blocks per up block.
TINY_LDM = {
    "input_blocks.1.1": "down_blocks.0.attentions.0",
    "input_blocks.3.1": "down_blocks.1.attentions.0",
    "middle_block.1": "mid_block.attentions.0",
    "output_blocks.0.1": "up_blocks.0.attentions.0",
    "output_blocks.1.1": "up_blocks.0.attentions.1",
    "output_blocks.2.1": "up_blocks.1.attentions.0",
    "output_blocks.3.1": "up_blocks.1.attentions.1",
}


def _pipe(base_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        base_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.fixture(scope="module")
def base_image(tiny_base_dir):
    return _image(_pipe(tiny_base_dir))


def _install_exported(pipe, out) -> None:
    """What train_custom_diffusion.py does: one processor per attention layer, weights from the file.

    `unet.load_attn_procs` alone would silently change nothing (diffusers issue #9320).
    """
    weights = load_file(out / WEIGHTS_NAME)
    procs = {}
    for name in pipe.unet.attn_processors:
        own = {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
        if not own:
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            continue
        out_f, in_f = own["to_k_custom_diffusion.weight"].shape
        procs[name] = CustomDiffusionAttnProcessor2_0(
            train_kv=True,
            train_q_out="to_q_custom_diffusion.weight" in own,
            hidden_size=out_f,
            cross_attention_dim=in_f,
        )
        procs[name].load_state_dict(own)
    pipe.unet.set_attn_processor(procs)
    for token_file in sorted(out.glob("<*>.safetensors")):
        pipe.load_textual_inversion(str(out), weight_name=token_file.name)


@pytest.mark.parametrize("rank", [None, 2])
def test_diffusers_with_exported_processors_matches_own_application(
    tmp_path, tiny_base_dir, tiny_base, base_image, rank
):
    concept = random_concept(tiny_base, 21, rank=rank)
    export_diffusers(concept, tiny_base, tmp_path / "export")
    theirs = _pipe(tiny_base_dir)
    _install_exported(theirs, tmp_path / "export")
    ours = _pipe(tiny_base_dir)
    apply_concepts(ours.unet, ours.text_encoder, ours.tokenizer, [concept])

    image = _image(theirs)
    assert image.shape == (1, 64, 64, 3)
    assert abs(image - _image(ours)).max() <= 1e-4
    assert abs(image - base_image).max() > 1e-2  # the concept does change the image
    # diffusers writes the very same bytes from those processors.
    theirs.unet.save_attn_procs(tmp_path / "diffusers")
    assert (tmp_path / "diffusers" / WEIGHTS_NAME).read_bytes() == (
        tmp_path / "export" / WEIGHTS_NAME
    ).read_bytes()
    keys = load_file(tmp_path / "export" / WEIGHTS_NAME).keys()
    assert len(keys) == 14
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight" in keys


def test_import_of_export_gives_back_the_artifact(tmp_path, tiny_base):
    source = random_concept(tiny_base, seed=22)
    export_diffusers(source, tiny_base, tmp_path / "a")
    first = import_concept(tmp_path / "a", tiny_base, class_words=["dog"])
    assert first.tokens == source.tokens and first.class_words == source.class_words
    assert (
        torch.equal(first.embeddings, source.embeddings) and first.base_fingerprint == tiny_base.fingerprint
    )
    layers = kv_layers(tiny_base.unet)
    assert first.deltas.keys() == source.deltas.keys()
    for name, delta in source.deltas.items():
        full = layers[name].weight + delta.dense  # what the file holds
        assert torch.equal(first.deltas[name].dense, full - layers[name].weight)
        # Only float32 rounding of the sum and the difference (half an ulp each) separates the two.
        back = first.deltas[name].dense
        assert ((back - delta.dense).abs() <= (full.abs() + back.abs()) * 2**-24).all()
    assert first.provenance["kind"] == "import" and first.provenance["format"] == "diffusers"
    assert set(first.provenance["files"]) == {WEIGHTS_NAME, "<new1>.safetensors"}

    # An imported artifact survives export and import bit for bit: same bytes, same digest.
    export_diffusers(first, tiny_base, tmp_path / "b")
    assert (tmp_path / "b" / WEIGHTS_NAME).read_bytes() == (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    second = import_concept(tmp_path / "b", tiny_base, class_words=["dog"])
    assert digest_of(concept_to_bytes(second)) == digest_of(concept_to_bytes(first))


def _full_weights(base, concept) -> dict[str, torch.Tensor]:
    return {
        f"{n}.weight": base.unet.get_submodule(n).weight + d.to_dense() for n, d in concept.deltas.items()
    }


def _assert_deltas_are(base, imported: Concept, full: dict[str, torch.Tensor]) -> None:
    expected = {
        k.removesuffix(".weight"): w - base.unet.get_submodule(k.removesuffix(".weight")).weight
        for k, w in full.items()
    }
    assert imported.deltas.keys() == expected.keys()
    assert all(torch.equal(imported.deltas[n].dense, expected[n]) for n in expected)


def test_original_delta_bin_imports(tmp_path, tiny_base):
    concept = random_concept(tiny_base, seed=23, token="<new1>")
    full = _full_weights(tiny_base, concept)
    torch.save(
        {"unet": full, "modifier_token": {"<new1>": concept.embeddings[0].clone()}}, tmp_path / "delta.bin"
    )
    imported = import_concept(tmp_path / "delta.bin", tiny_base, class_words=["dog"])
    _assert_deltas_are(tiny_base, imported, full)
    assert imported.tokens == ("<new1>",) and torch.equal(imported.embeddings, concept.embeddings)
    assert imported.provenance["format"] == "original-diffusers"
    assert list(imported.provenance["files"]) == ["delta.bin"]


def test_original_crossattn_delta_bin_is_refused_where_it_changes_to_q_or_to_out(tmp_path, tiny_base):
    attn = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    unet = {
        f"{n}.{kind}": getattr(m, kind).detach().clone()
        for n, m in kv_layers(tiny_base.unet, CROSSATTN_SUFFIXES).items()
        for kind in ("weight", "bias")
        if getattr(m, kind) is not None
    }
    unet[f"{attn}.to_k.weight"] += 0.01
    torch.save({"unet": unet, "modifier_token": {}}, tmp_path / "delta.bin")
    imported = import_concept(tmp_path / "delta.bin", tiny_base)
    assert list(imported.deltas) == [f"{attn}.to_k"] and imported.tokens == ()  # unchanged layers dropped
    assert torch.allclose(imported.deltas[f"{attn}.to_k"].dense, torch.full((64, 32), 0.01), atol=1e-6)

    unet[f"{attn}.to_q.weight"] += 0.01
    unet[f"{attn}.to_out.0.weight"] += 0.01
    torch.save({"unet": unet}, tmp_path / "delta.bin")
    with pytest.raises(InvalidArgument, match=rf"delta.bin: changes {attn}.to_out.0 \(2 to_q/to_out layers: trained "
                       r"with --freeze_model crossattn\); customdiff serves to_k/to_v concepts only"):
        import_concept(tmp_path / "delta.bin", tiny_base)

    unet[f"{attn}.to_out.0.bias"] += 0.01
    torch.save({"unet": unet}, tmp_path / "delta.bin")
    with pytest.raises(InvalidArgument, match=rf"delta.bin: '{attn}.to_out.0.bias' changes a bias"):
        import_concept(tmp_path / "delta.bin", tiny_base)


def test_original_compressed_delta_bin_gives_low_rank_factors(tmp_path, tiny_base):
    concept = random_concept(tiny_base, seed=24, rank=3)
    unet = {f"{n}.weight": {"u": d.up, "v": d.down} for n, d in concept.deltas.items()}
    torch.save(
        {"unet": unet, "modifier_token": {"<new1>": concept.embeddings[0]}}, tmp_path / "compressed_delta.bin"
    )
    imported = import_concept(tmp_path / "compressed_delta.bin", tiny_base)
    assert all(
        torch.equal(imported.deltas[n].up, d.up) and torch.equal(imported.deltas[n].down, d.down)
        for n, d in concept.deltas.items()
    )


def test_original_ldm_checkpoint_imports(tmp_path, tiny_base):
    concept = random_concept(tiny_base, seed=25)
    full = _full_weights(tiny_base, concept)
    to_ldm = {v: k for k, v in TINY_LDM.items()}
    state = {}
    for key, weight in full.items():
        block = key.split(".transformer_blocks")[0]
        state["model.diffusion_model." + key.replace(block, to_ldm[block])] = weight
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_v.weight" in state
    state["embed"] = concept.embeddings.clone()  # src/get_deltas.py: the last rows of the token table
    torch.save({"state_dict": state}, tmp_path / "delta_epoch=000004.ckpt")

    imported = import_concept(tmp_path / "delta_epoch=000004.ckpt", tiny_base)
    _assert_deltas_are(tiny_base, imported, full)
    assert imported.tokens == ("<new1>",) and torch.equal(imported.embeddings, concept.embeddings)
    assert imported.provenance["format"] == "original-ldm"
    named = import_concept(
        tmp_path / "delta_epoch=000004.ckpt", tiny_base, tokens=["<mycat>"], class_words=["cat"]
    )
    assert named.tokens == ("<mycat>",) and named.class_words == ("cat",)


def test_ldm_block_prefixes_follow_the_unet_config():
    assert {
        k: v
        for k, v in ldm_block_prefixes({"layers_per_block": 1, "block_out_channels": [32, 64]}).items()
        if k in TINY_LDM
    } == TINY_LDM
    # SD-1.x/2.x: the table the original repo's src/convert.py hard-codes.
    sd = ldm_block_prefixes({"layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280]})
    for i in (1, 2, 4, 5, 7, 8):
        assert sd[f"input_blocks.{i}.1"] == f"down_blocks.{i // 3}.attentions.{0 if i in (1, 4, 7) else 1}"
    for i in range(3, 12):
        assert sd[f"output_blocks.{i}.1"] == f"up_blocks.{i // 3}.attentions.{i % 3}"
    assert sd["middle_block.1"] == "mid_block.attentions.0"


def _write(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        torch.save(obj, path)


_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
_W = torch.zeros(32, 32)
BAD_FILES = [
    ("garbage.bin", b"\x00not a checkpoint" * 8, CorruptArtifact, "garbage.bin: neither safetensors nor"),
    (
        "delta.bin",
        {"unet": {_K: torch.zeros(3, 3)}},
        CorruptArtifact,
        rf"delta.bin: '{_K}' must be \(32, 32\)",
    ),
    (
        "delta.bin",
        {"unet": {"conv_in.weight": torch.zeros(3)}},
        CorruptArtifact,
        "not a cross-attention projection",
    ),
    ("delta.bin", {"unet": {}, "text_encoder": {}}, InvalidArgument, "fine-tuned text encoder"),
    ("delta.bin", {"weights": {}}, CorruptArtifact, r"not a Custom Diffusion delta.bin \('unet'\) or .ckpt"),
    ("delta.bin", {"unet": {_K: {"u": torch.zeros(32, 2)}}}, CorruptArtifact, "compressed"),
    (
        "delta.bin",
        {"unet": {}, "modifier_token": {"<new1>": torch.zeros(8)}},
        CorruptArtifact,
        r"embedding of '<new1>' must be \[32\] here, got \(8,\)",
    ),
    (
        "delta.bin",
        {"unet": {}, "modifier_token": {"dog</w>": torch.zeros(32)}},
        InvalidArgument,
        r"tokens: \['dog</w>'\] already exist",
    ),
    (
        "delta_epoch=1.ckpt",
        {"state_dict": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": _W}},
        CorruptArtifact,
        "input_blocks.2.1.* is not an attention parameter of this base's LDM UNet",
    ),
    (
        "delta_epoch=1.ckpt",
        {"state_dict": {"embed": torch.zeros(32)}},
        CorruptArtifact,
        r"'embed' must be \[n_tokens, hidden\]",
    ),
]


@pytest.mark.parametrize("name,content,error,match", BAD_FILES)
def test_bad_original_files_name_the_file_and_the_fault(tmp_path, tiny_base, name, content, error, match):
    _write(tmp_path / name, content)
    with pytest.raises(error, match=match) as e:
        import_concept(tmp_path / name, tiny_base)
    assert error is InvalidArgument or str(tmp_path / name) in str(e.value)


def test_bad_diffusers_exports_are_refused(tmp_path, tiny_base):
    with pytest.raises(InvalidArgument, match=f"{tmp_path} holds no {WEIGHTS_NAME}"):
        import_concept(tmp_path, tiny_base, fmt="diffusers")
    export_diffusers(random_concept(tiny_base, seed=26), tiny_base, tmp_path)
    with pytest.raises(InvalidArgument, match="class_words: expected one per token"):
        import_concept(tmp_path, tiny_base, class_words=["dog", "cat"])
    with pytest.raises(InvalidArgument, match="has no <other>.safetensors"):
        import_concept(tmp_path, tiny_base, tokens=["<other>"])
    (tmp_path / "<new1>.safetensors").rename(tmp_path / "<new2>.safetensors")
    with pytest.raises(CorruptArtifact, match=r"<new2>.safetensors: a token file holds exactly \{'<new2>'"):
        import_concept(tmp_path, tiny_base)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CorruptArtifact, match=f"{weights}: unreadable safetensors file"):
        import_concept(tmp_path, tiny_base)


def test_export_refuses_a_concept_of_another_base(tmp_path, tiny_base, other_base_dir):
    other = load_base(other_base_dir)
    with pytest.raises(BaseMismatch) as e:
        export_diffusers(random_concept(other, seed=27), tiny_base, tmp_path)
    assert other.fingerprint in str(e.value) and tiny_base.fingerprint in str(e.value)


def test_cli_export_then_import_by_digest(tmp_path, tiny_base_dir, tiny_base, capsys):
    store = str(tmp_path / "store")
    source = ArtifactStore(store).put_concept(random_concept(tiny_base, seed=28))
    common = ["--base", str(tiny_base_dir)]
    digests = []
    for i, digest in enumerate([source, None]):
        out = str(tmp_path / f"x{i}")
        assert main(["export", digest or digests[-1], "--store", store, *common, "--out", out]) == 0
        assert json.loads(capsys.readouterr().out)["files"][0].endswith(WEIGHTS_NAME)
        assert main(["import", out, "--store", store, *common, "--class-word", "dog"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["tokens"] == ["<new1>"] and printed["layers"] == 14
        digests.append(printed["digest"])
    assert digests[0] == digests[1] != source  # the import of an import is the same artifact

    assert main(["export", digests[0], *common, "--out", str(tmp_path / "y")]) == 2
    assert "--store is required" in capsys.readouterr().err
