"""`customdiff merge` and `customdiff compress` on the tiny base: store in, store out, report printed."""

from __future__ import annotations

import json

import pytest
import torch

from concepts.artifact import concept_to_bytes
from concepts.base import load_base
from concepts.store import ArtifactStore
from customdiff.__main__ import main
from tests.conftest import random_concept


@pytest.fixture(scope="module")
def store_with_two(tiny_base_dir, tmp_path_factory):
    base = load_base(tiny_base_dir)
    store = ArtifactStore(str(tmp_path_factory.mktemp("store")))
    digests = [store.put_concept(random_concept(base, seed=i, token="<new1>", class_word=w))
               for i, w in enumerate(("dog", "cat"))]
    return store, digests


def test_merge_json_prints_the_report_and_stores_the_result(tiny_base_dir, store_with_two, tmp_path, capsys):
    store, (a, b) = store_with_two
    out = tmp_path / "out"
    assert main(["merge", a, f"sha256:{b}", "--base", str(tiny_base_dir), "--store", store.url,
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == ["<new1>", "<new2>"]
    assert result["report"]["renamed_tokens"] == ["<new1> -> <new2>"]
    assert result["report"]["summary"]["residual"] <= 1e-4
    assert len(result["report"]["layers"]) == 14
    assert set(result["report"]["layers"][0]) == {"layer", "residual", "drift", "naive_residual", "naive_drift",
                                                  "rank", "relative_error"}
    merged = ArtifactStore(str(out)).get_concept(result["digest"])
    assert merged.provenance["parents"] == [a, b]


def test_compress_json_from_a_file_and_table_output(store_with_two, tmp_path, capsys):
    store, (a, _) = store_with_two
    path = tmp_path / "a.safetensors"
    path.write_bytes(concept_to_bytes(store.get_concept(a)))
    assert main(["compress", str(path), "--store", store.url, "--fraction", "0.6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = result["report"]["summary"]
    assert summary["bytes_after"] < summary["bytes_before"]
    compressed = store.get_concept(result["digest"])
    assert all(d.up.dtype == torch.float16 for d in compressed.deltas.values())
    ranks = [layer["rank"] for layer in result["report"]["layers"]]
    assert ranks == [d.rank for _, d in sorted(compressed.deltas.items())]

    assert main(["compress", a, "--store", store.url, "--rank", "2", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "relative_error" in text and "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in text


def test_compress_weighs_a_merge_by_its_features_when_given_the_base(tiny_base_dir, store_with_two, tmp_path,
                                                                     capsys):
    store, (a, b) = store_with_two
    assert main(["merge", a, b, "--base", str(tiny_base_dir), "--store", store.url, "--out", str(tmp_path),
                 "--json"]) == 0
    merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["digest"]
    assert main(["compress", merged, "--base", str(tiny_base_dir), "--store", str(tmp_path),
                 "--fraction", "0.6", "--json"]) == 0
    digest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["digest"]
    assert ArtifactStore(str(tmp_path)).get_concept(digest).provenance["metric"] == "features"
    assert main(["compress", merged, "--store", str(tmp_path), "--fraction", "0.6", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "without --base" in err
    digest = json.loads(out.strip().splitlines()[-1])["digest"]
    assert "metric" not in ArtifactStore(str(tmp_path)).get_concept(digest).provenance
    assert main(["compress", a, "--base", str(tiny_base_dir), "--store", store.url, "--out", str(tmp_path),
                 "--rank", "2", "--json"]) == 0  # a single: plain SVD, as before
    digest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["digest"]
    assert "metric" not in ArtifactStore(str(tmp_path)).get_concept(digest).provenance


def test_compress_rejects_a_concept_of_another_base(other_base_dir, store_with_two, capsys):
    store, (a, _) = store_with_two
    assert main(["compress", a, "--base", str(other_base_dir), "--store", store.url, "--rank", "2"]) == 2
    assert "base fingerprint" in capsys.readouterr().err


def test_merge_of_an_unknown_digest_fails_cleanly(tiny_base_dir, store_with_two, capsys):
    store, (a, _) = store_with_two
    assert main(["merge", a, "0" * 64, "--base", str(tiny_base_dir), "--store", store.url]) == 2
    assert "no blob sha256:" in capsys.readouterr().err


def test_merge_and_compress_show_stage_bars_on_stderr_only(tiny_base_dir, store_with_two, tmp_path, capsys,
                                                           monkeypatch):
    store, (a, b) = store_with_two
    assert main(["merge", a, b, "--base", str(tiny_base_dir), "--store", store.url, "--out", str(tmp_path),
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert "merge:" not in err  # stderr is no terminal here: no bar
    monkeypatch.setenv("CUSTOMDIFF_PROGRESS", "1")
    assert main(["merge", a, b, "--base", str(tiny_base_dir), "--store", store.url, "--out", str(tmp_path),
                 "--json"]) == 0
    forced_out, err = capsys.readouterr()
    assert forced_out == out  # stdout stays the report alone
    assert "merge: 100%" in err and "3/3" in err and "loading base" in err
    assert main(["compress", a, "--store", store.url, "--out", str(tmp_path), "--rank", "1",
                 "--base", str(tiny_base_dir)]) == 0
    assert "compress: 100%" in capsys.readouterr().err
