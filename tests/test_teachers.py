"""The built-in corpora and teachers build offline, from nothing, deterministically, and are cached."""

from __future__ import annotations

import dataclasses
import json

import pytest

from npt.corpus import fingerprint, load_corpus, stdlib_docstrings
from npt.errors import NPTError
from npt.loading import load_model
from npt import logs
from npt.teachers import DEFAULT_RECIPE, ZOO, TeacherRecipe, ensure_teacher, zoo_recipe

pytestmark = pytest.mark.slow

MICRO = TeacherRecipe(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seq_len=32, batch_size=4, steps=3, warmup_steps=1)


def test_docstring_corpus_is_english_text_of_the_expected_size_and_deterministic(tmp_path):
    docs = load_corpus("docstrings", tmp_path)
    total = sum(map(len, docs))
    assert 1_000_000 < total < 5_000_000 and len(docs) > 3000
    assert fingerprint(docs) == fingerprint(stdlib_docstrings())
    assert sum(" the " in d for d in docs) > len(docs) / 3


@pytest.mark.parametrize("name, marker", [("code", "def "), ("prose", " the ")])
def test_code_and_prose_corpora(tmp_path, name, marker):
    docs = load_corpus(name, tmp_path)
    assert 300_000 < sum(map(len, docs)) < 5_000_000 and len(docs) > 1000
    assert sum(marker in d for d in docs) > len(docs) / 2
    assert load_corpus(name, tmp_path) == docs  # read back from the cache
    with pytest.raises(NPTError, match="Unknown embedded corpus"):
        load_corpus("poetry", tmp_path)


def test_default_teacher_builds_from_nothing_offline_and_is_cached(tmp_path, capsys):
    logs.configure()  # the commands do this; the build logs through the package's logger
    path = ensure_teacher(MICRO, tmp_path, progress=True)
    out = capsys.readouterr().out
    assert "held-out perplexity" in out
    info = json.loads((path / "build_info.json").read_text())
    assert info["heldout_perplexity"] > 1 and info["recipe"] == dataclasses.asdict(MICRO)
    model, tok = load_model(str(path), "float32", "cpu")
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    stamp = (path / "build_info.json").stat().st_mtime_ns
    assert ensure_teacher(MICRO, tmp_path, progress=False) == path  # cached: not rebuilt
    assert (path / "build_info.json").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp-*"))  # the build was written atomically


def test_a_zoo_shaped_teacher_builds_with_its_architecture_and_corpus(tmp_path):
    recipe = dataclasses.replace(MICRO, architecture="qwen2", num_heads=4, num_kv_heads=2, corpus="code", tie_embeddings=False)
    path = ensure_teacher(recipe, tmp_path, progress=False)
    model, _ = load_model(str(path), "float32", "cpu")
    c = model.config
    assert (c.model_type, c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == ("qwen2", 4, 2, False)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert json.loads((path / "build_info.json").read_text())["corpus_sha256"] == fingerprint(load_corpus("code", tmp_path))


@pytest.mark.parametrize("architecture, placement", [("gemma3", "sandwich"), ("olmo2", "post-norm")])
def test_teachers_of_the_other_placements_build_load_and_convert(tmp_path, architecture, placement):
    from npt.model import NPTModel

    recipe = dataclasses.replace(MICRO, architecture=architecture, num_layers=6, sliding_window=8 if architecture == "gemma3" else None)
    path = ensure_teacher(recipe, tmp_path, progress=False)
    model, _ = load_model(str(path), "float32", "cpu")
    if architecture == "gemma3":  # five sliding-window layers per full one, the window shorter than a block
        assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"] and model.config.sliding_window == 8
    npt = NPTModel.convert(model, "all", rank=4)
    assert {layer.wiring.placement for layer in npt.npt_layers.values()} == {placement}


def test_the_zoo_spans_what_matters_for_npt():
    recipes = [DEFAULT_RECIPE, *ZOO.values()]
    assert len(ZOO) >= 4
    assert {r.architecture for r in recipes} == {"llama", "mistral", "qwen2", "gemma3", "olmo2"}
    assert min(r.num_layers for r in recipes) == 2 and max(r.num_layers for r in recipes) == 12
    assert min(r.hidden_size for r in recipes) == 64 and max(r.hidden_size for r in recipes) == 384
    assert len({r.num_heads // (r.num_kv_heads or r.num_heads) for r in recipes}) >= 3  # GQA ratios
    assert len({r.vocab_size for r in recipes}) >= 4 and len({r.corpus for r in recipes}) >= 3
    # the embedded default's cache key did not change when the recipe gained fields
    assert DEFAULT_RECIPE.fingerprint("x") == TeacherRecipe().fingerprint("x")
    assert zoo_recipe("zoo:mistral-deep") is ZOO["mistral-deep"]
    with pytest.raises(NPTError, match="not a teacher of the zoo"):
        zoo_recipe("zoo:gpt5")
