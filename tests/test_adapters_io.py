"""Adapter files: adapters only, safetensors + JSON, exact round trip, damage detected."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapters, tiny_model

from npt.errors import NPTError
from npt.model import NPTModel
from npt.serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def test_round_trip_onto_a_given_base_model_is_exact(tmp_path):
    npt = NPTModel.convert(tiny_model(seed=4), "0,2", rank=3, num_ranks=2, modulation_scale=0.5)
    randomize_adapters(npt, scale=0.2)
    npt.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["layers"] == [0, 2] and cfg["rank"] == 3 and cfg["num_ranks"] == 2 and cfg["modulation_scale"] == 0.5
    assert cfg["dtype"] == "float32" and len(cfg["adapter_sha256"]) == 64
    loaded = NPTModel.from_pretrained(tmp_path, base_model=tiny_model(seed=4))
    for k, v in npt.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(npt(input_ids=x).logits, loaded(input_ids=x).logits)


def test_from_pretrained_loads_the_base_model_named_in_the_config(tmp_path, micro_teacher):
    from npt.loading import load_model

    model, _ = load_model(str(micro_teacher[0]), "float32", "cpu")
    npt = NPTModel.convert(model, "all", rank=4)
    randomize_adapters(npt, 1, scale=0.2)
    assert npt.npt_config.base_model_name_or_path.endswith("teacher")
    npt.save_pretrained(tmp_path / "adapter")
    loaded = NPTModel.from_pretrained(tmp_path / "adapter")  # no base model given: loaded from the config
    x = torch.randint(0, 290, (1, 12))
    with torch.no_grad():
        assert torch.equal(npt(input_ids=x).logits, loaded(input_ids=x).logits)
        with loaded.teacher_mode(), npt.teacher_mode():
            assert torch.equal(npt(input_ids=x).logits, loaded(input_ids=x).logits)


def test_adapter_file_of_the_default_model_holds_the_adapters_only(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from npt.model import AdapterArguments
    from npt.teachers import DEFAULT_RECIPE as r

    cfg = AdapterArguments()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=r.vocab_size, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
                                         num_hidden_layers=r.num_layers, num_attention_heads=r.num_heads, tie_word_embeddings=True))
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    npt = NPTModel.convert(model, cfg.npt_layers, cfg.adapter_rank, cfg.num_ranks, modulate=cfg.modulate)
    npt.save_pretrained(tmp_path)
    size = (tmp_path / ADAPTER_WEIGHTS).stat().st_size
    n_adapter = sum(p.numel() for p in npt.adapter_parameters())
    from safetensors import safe_open

    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), "pt") as f:
        names = list(f.keys())
    assert n_adapter * 4 <= size < n_adapter * 4 + 128 * len(names)  # the adapters in float32 and a header, nothing else
    assert cfg.modulate == "gate,up,down"
    assert sorted({n.split(".", 2)[2] for n in names}) == [
        "A.weight", "B_f.weight", "B_m.weight", "c_a", "c_f", "c_m", "down.B_f.weight", "down.B_m.weight", "down.c_f", "down.c_m",
        "gain.bias", "gain.weight", "up.B_f.weight", "up.B_m.weight", "up.c_f", "up.c_m", "up.gain.bias", "up.gain.weight", "z_bias"], names
    # per layer A [r, d]; gate and up: B_m [k d, r], B_f [k f, r] and a gain of r + 1; down: B_m
    # [k f, r], B_f [k d, r]; the bottleneck bias, r. At the default k = 6, r = 32 (k r 192) that is
    # within 10% of the k 11, r 16 it replaced (k r 176): the wider A, the gains and the bias are the difference
    d, f, k, rank = r.hidden_size, r.intermediate_size, cfg.num_ranks, cfg.adapter_rank
    assert cfg.bottleneck_bias
    assert n_adapter == r.num_layers * (rank * d + 3 * k * (d + f) * rank + 2 * (rank + 1) + rank)
    before = r.num_layers * (16 * d + 3 * 11 * (d + f) * 16 + 2 * 17)
    assert 1.0 < n_adapter / before < 1.1
    assert n_adapter * 4 < 1.2 * base_bytes  # 1.14x this small teacher's own size; far less of a real model's


def test_adapters_without_a_gain_load_as_written_before_it_existed(tmp_path):
    """A file from before the gate gain (no `gate_gain` key, no gain tensors) rebuilds adapters
    without one, computing exactly what it did."""
    npt = NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, gate_gain=False, modulate="gate")
    randomize_adapters(npt, seed=2)
    npt.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config.pop("gate_gain") is False and config.pop("modulate") == ["gate"]  # neither existed then
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = NPTModel.from_pretrained(tmp_path, base_model=tiny_model())
    assert all(layer.adapter.gain is None for layer in loaded.npt_layers.values())
    assert not any(".gain." in k for k in loaded.adapter_state_dict())
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(npt(input_ids=x).logits, loaded(input_ids=x).logits)
    with pytest.raises(NPTError, match="gate_gain"):  # a gained student cannot take these weights
        NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, modulate="gate").load_adapter_state_dict(loaded.adapter_state_dict())


def test_damaged_or_mismatched_adapters_are_refused(tmp_path):
    npt = NPTModel.convert(tiny_model(), "all", rank=2)
    npt.save_pretrained(tmp_path)
    data = bytearray((tmp_path / ADAPTER_WEIGHTS).read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(NPTError, match="checksum"):
        NPTModel.from_pretrained(tmp_path, base_model=tiny_model())
    npt.save_pretrained(tmp_path)
    with pytest.raises(NPTError, match="trained on a base model with"):
        NPTModel.from_pretrained(tmp_path, base_model=tiny_model(hidden_size=64, intermediate_size=96))
    with pytest.raises(NPTError, match="No adapter_config.json"):
        NPTModel.from_pretrained(tmp_path / "nowhere", base_model=tiny_model())


@pytest.mark.parametrize("modulate", ["gate,up", "gate,up,down"])
def test_dual_and_triple_modulation_adapters_round_trip_and_refuse_another_variant(tmp_path, modulate):
    npt = NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, modulate=modulate)
    randomize_adapters(npt, seed=4)
    npt.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modulate"] == modulate.split(",")
    loaded = NPTModel.from_pretrained(tmp_path, base_model=tiny_model())
    assert loaded.npt_config.modulate == modulate.split(",")
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(npt(input_ids=x).logits, loaded(input_ids=x).logits)
    other = "gate" if modulate == "gate,up,down" else "gate,up,down"
    with pytest.raises(NPTError, match="--modulate"):  # adapters of another variant cannot take these weights
        NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, modulate=other).load_adapter_state_dict(loaded.adapter_state_dict())
    with pytest.raises(NPTError, match="--modulate 'gate,left'"):
        NPTModel.convert(tiny_model(), "all", modulate="gate,left")


def test_the_adapter_input_round_trips_and_older_files_read_the_attention_output(tmp_path):
    npt = NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, adapter_input="relative")
    randomize_adapters(npt, seed=5)
    npt.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["adapter_input"] == "relative"
    loaded = NPTModel.from_pretrained(tmp_path, base_model=tiny_model())
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(npt(input_ids=x).logits, loaded(input_ids=x).logits)
    del config["adapter_input"]  # a file written before the choice existed: the attention output
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    older = NPTModel.from_pretrained(tmp_path, base_model=tiny_model())
    assert older.npt_config.adapter_input == "attention"
    with torch.no_grad():
        assert not torch.allclose(older(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-4)


def test_a_bottleneck_bias_round_trips_and_adapters_without_it_are_refused(tmp_path):
    npt = NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, bottleneck_bias=True)
    randomize_adapters(npt, seed=5)
    npt.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["bottleneck_bias"] is True
    loaded = NPTModel.from_pretrained(tmp_path, base_model=tiny_model())
    assert loaded.npt_config.bottleneck_bias and torch.equal(loaded.npt_layers[0].adapter.z_bias, npt.npt_layers[0].adapter.z_bias)
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(npt(input_ids=x).logits, loaded(input_ids=x).logits)
    with pytest.raises(NPTError, match="--bottleneck_bias"):
        NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, bottleneck_bias=False).load_adapter_state_dict(loaded.adapter_state_dict())
    del config["bottleneck_bias"]  # a file written before the bias existed: none
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(NPTError, match="unexpected"):
        NPTModel.from_pretrained(tmp_path, base_model=tiny_model())
