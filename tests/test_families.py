"""The dense families beyond Llama's placement convert, prove themselves and train: Gemma 2 and 3
(sandwich norms; Gemma 2 with its final logit softcap, Gemma 3 with sliding and full attention
layers), OLMo 2 (norms after attention and MLP only), Phi-3 and GLM (one fused gate-up
projection), Granite (a residual multiplier and a logit divisor). Each on a tiny in-process model:
the proof, teacher mode, the NPT layer against the formula written out by hand, a training step
in each phase, adapters saved and reloaded. Mixture-of-experts stays refused (other wirings: test_conversion.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_adapters

from npt.architecture import decoder_layers
from npt.errors import UnsupportedArchitectureError
from npt.kl import LogitHead, softened_kl
from npt.losses import LossConfig, NPTLoss
from npt.model import NPTModel
from npt.objective import EquivalenceObjective, calibrate_adapters

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(name: str):
    import transformers as tf

    return {
        "gemma2": lambda: tf.Gemma2Config(**BASE, head_dim=8, sliding_window=4, final_logit_softcapping=3.0),
        "gemma3": lambda: tf.Gemma3TextConfig(**BASE | {"num_hidden_layers": 3}, head_dim=8, sliding_window=4,
                                              layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        "olmo2": lambda: tf.Olmo2Config(**BASE),
        "exaone4": lambda: tf.Exaone4Config(**BASE),
        "olmo3": lambda: tf.Olmo3Config(**BASE),
        "phi4-mini": lambda: tf.Phi3Config(**BASE, partial_rotary_factor=0.75),
        "phi3": lambda: tf.Phi3Config(**BASE),
        "glm": lambda: tf.GlmConfig(**BASE, head_dim=8),
        "glm4": lambda: tf.Glm4Config(**BASE, head_dim=8),
        "granite": lambda: tf.GraniteConfig(**BASE, residual_multiplier=0.22, logits_scaling=8.0, embedding_multiplier=12.0),
    }[name]()


# the placement each family must be read as, and whether its gate and up are one fused projection
FAMILIES = {"gemma2": ("sandwich", False), "gemma3": ("sandwich", False), "olmo2": ("post-norm", False), "exaone4": ("post-norm", False), "olmo3": ("post-norm", False),
            "phi4-mini": ("pre-norm", True),
            "phi3": ("pre-norm", True), "glm": ("pre-norm", True), "glm4": ("sandwich", True), "granite": ("pre-norm", False)}


def _model(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name)).eval()
    for layer in decoder_layers(model):  # trained-looking norms, so that a misplaced norm cannot pass as the identity
        for module in layer.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.data.uniform_(-0.5, 0.5)
    return model


def _hand_npt_layer(name: str, layer, adapter, h: torch.Tensor, a: torch.Tensor, modulated: bool = True) -> torch.Tensor:
    """The NPT layer written out for each family from the HF module's own parts, each modulated
    projection W x -> (1 + gamma) W x + s sum_j v_f[j] (v_m[j] . x) (`modulated` False: without
    the modulations)."""
    z = adapter.c_a * a @ adapter.A.weight.T + (adapter.z_bias if adapter.z_bias is not None else 0.0)

    def modulation(mod, x):  # (gamma, s sum_j v_f[j] (v_m[j] . x)) of one projection
        v_m, v_f = mod.terms(z)
        delta = mod.scale * torch.einsum("...k,...kf->...f", torch.einsum("...kd,...d->...k", v_m, x), v_f)
        gamma = (mod.gain.bias + z @ mod.gain.weight[0] / mod.rank**0.5).unsqueeze(-1) if mod.gain is not None else 0.0
        return gamma * modulated, delta * modulated

    def gated(x, gate, up, act):
        gamma, delta = modulation(adapter, x)
        gate = gate + gamma * gate + delta
        if adapter.up is not None:
            gamma, delta = modulation(adapter.up, x)
            up = up + gamma * up + delta
        y = act(gate) * up
        out = layer.mlp.down_proj(y)
        if adapter.down is not None:  # in d_model space, before the post-feedforward norm
            out = out + modulation(adapter.down, y)[1]
        return out

    mlp = layer.mlp
    if name in ("gemma2", "gemma3"):  # sandwich: the MLP reads pre_feedforward_layernorm(h), its output is normed too
        x = layer.pre_feedforward_layernorm(h)
        return h + layer.post_feedforward_layernorm(gated(x, mlp.gate_proj(x), mlp.up_proj(x), mlp.act_fn))
    if name == "glm4":  # sandwich under GLM-4's names, fused gate-up
        x = layer.post_attention_layernorm(h)
        f = mlp.gate_up_proj.out_features // 2
        return h + layer.post_mlp_layernorm(gated(x, x @ mlp.gate_up_proj.weight[:f].T, x @ mlp.gate_up_proj.weight[f:].T, mlp.activation_fn))
    if name in ("olmo2", "olmo3", "exaone4"):  # post-norm: the MLP reads h itself
        return h + layer.post_feedforward_layernorm(gated(h, mlp.gate_proj(h), mlp.up_proj(h), mlp.act_fn))
    x = layer.post_attention_layernorm(h)
    if name in ("phi3", "phi4-mini", "glm"):  # fused: the first half of gate_up_proj's rows is the gate
        f = mlp.gate_up_proj.out_features // 2
        w = mlp.gate_up_proj.weight
        return h + gated(x, x @ w[:f].T, x @ w[f:].T, mlp.activation_fn)
    return h + layer.residual_multiplier * gated(x, mlp.gate_proj(x), mlp.up_proj(x), mlp.act_fn)  # granite


def _hand_attention(name: str, layer, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if name in ("olmo2", "olmo3", "exaone4"):
        return layer.post_attention_layernorm(layer.self_attn(hidden_states=h, **kwargs)[0])
    a = layer.self_attn(hidden_states=layer.input_layernorm(h), **kwargs)[0]
    if name == "glm4":
        return layer.post_self_attn_layernorm(a)
    return layer.post_attention_layernorm(a) if name.startswith("gemma") else a


@pytest.mark.parametrize("modulate", ["gate", "gate,up,down"])  # dual (gate,up) by hand: test_npt_core.py
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_converts_with_its_placement_and_computes_the_formula(name, modulate):
    from npt.capture import capture_teacher

    model = _model(name)
    x = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=x).logits
    npt = NPTModel.convert(model, "all", rank=4, num_ranks=2, modulate=modulate)
    placement, fused = FAMILIES[name]
    assert {(layer.wiring.placement, layer.wiring.fused_gate_up) for layer in npt.npt_layers.values()} == {(placement, fused)}
    # teacher mode is the unconverted model, exactly
    with torch.no_grad(), npt.teacher_mode():
        torch.testing.assert_close(npt(input_ids=x).logits, before, rtol=0, atol=0)
    # the recorded attention branch and the NPT layer against the hand formula, with a non-zero adapter
    calibrate_adapters(npt, x)  # the model's own scales, so the modulation is of the gate's size
    randomize_adapters(npt, seed=3, scale=1.0)  # unit entries, like A and B_m at their init
    records, _ = capture_teacher(npt, x)
    for idx, npt_layer in npt.npt_layers.items():
        rec, layer = records[idx], npt_layer.layer
        with torch.no_grad():
            torch.testing.assert_close(rec.attn, _hand_attention(name, layer, rec.inputs, rec.attn_kwargs), rtol=1e-5, atol=1e-6)
            ours, _ = npt_layer.call("student_output", rec.inputs, rec.attn)
            hand = _hand_npt_layer(name, layer, npt_layer.adapter, rec.inputs, rec.attn)
            unmodulated = _hand_npt_layer(name, layer, npt_layer.adapter, rec.inputs, rec.attn, modulated=False)
        update, hand_update = ours - rec.inputs, hand - rec.inputs
        # the updates are differences of outputs with the input: float32 rounding of the input's size stays in them
        atol = 1e-5 * hand_update.abs().max().item() + 2 * torch.finfo(torch.float32).eps * rec.inputs.abs().max().item()
        torch.testing.assert_close(update, hand_update, rtol=1e-4, atol=atol)
        assert (hand - unmodulated).norm() > 0.05 * hand_update.norm()  # the modulation is a real part of it
    # the LM head path gives the model's own logits (Gemma 2's softcap, Granite's divisor)
    from npt.capture import final_hidden

    with torch.no_grad(), npt.teacher_mode():
        torch.testing.assert_close(LogitHead.of(npt.model)(final_hidden(npt.model, x, None)), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_trains_in_both_phases_and_its_adapters_reload(name, tmp_path):
    modulate = "gate,up,down" if name in ("gemma3", "olmo2", "phi3", "glm4", "granite") else "gate"  # every placement, fused too
    npt = NPTModel.convert(_model(name), "all", rank=4, num_ranks=2, modulate=modulate)
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    obj = EquivalenceObjective(npt, NPTLoss(LossConfig(logit_kl_weight=1.0), len(npt.npt_layers)))
    opt = torch.optim.Adam(npt.adapter_parameters(), lr=1e-2)
    losses = []
    for step in range(6):
        out = obj(x, mask, step=step, free_running=step % 2 == 1)
        out.objective.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in npt.adapter_parameters())
        assert any(p.grad.abs().sum() > 0 for p in npt.adapter_parameters())
        opt.step()
        opt.zero_grad()
        losses.append(out.objective.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        trained = npt(input_ids=x).logits
    npt.save_pretrained(tmp_path / "adapter")
    reloaded = NPTModel.from_pretrained(tmp_path / "adapter", base_model=_model(name))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, trained, rtol=0, atol=0)


def test_a_fused_gate_is_modulated_without_a_copy_of_its_weights():
    """Phi-3's gate_up_proj is read as one GEMM: its weight is never split into new tensors, and
    the gate rows that injection and the regulariser see are a view of it."""
    npt = NPTModel.convert(_model("phi3"), "all", rank=4)
    layer = npt.npt_layers[0]
    weight = layer.layer.mlp.gate_up_proj.weight
    gate_rows = layer.wiring.gate_weight(layer.layer)
    assert gate_rows.data_ptr() == weight.data_ptr() and gate_rows.shape == (64, 32)
    assert layer.gate_weight_sq_norm().item() == pytest.approx(weight[:64].double().pow(2).sum().item(), rel=1e-6)
    calls = []
    handle = layer.layer.mlp.gate_up_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad():
        layer.npt_output(torch.randn(1, 3, 32), torch.randn(1, 3, 32))
    handle.remove()
    assert calls == [torch.Size([1, 3, 128])]  # one GEMM over both halves


@pytest.mark.parametrize("divisor, softcap", [(1.0, None), (8.0, None), (1.0, 3.0), (2.0, 1.5)])
def test_the_chunked_kl_through_a_capped_and_scaled_head_equals_the_full_logits_kl(divisor, softcap):
    """Value and gradient of the chunked logit KL through Gemma 2's softcap and Granite's divisor
    against autograd on the full logits, cap * tanh(W h / (d cap))."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(11, 6, dtype=torch.float64, generator=g)
    head = LogitHead(weight, None, divisor, softcap)
    h_t = torch.randn(2, 5, 6, dtype=torch.float64, generator=g) * 2
    h_s = torch.randn(2, 5, 6, dtype=torch.float64, generator=g).mul(2).requires_grad_(True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])

    def full(h):
        z = F.linear(h, weight) / divisor
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    for temp in (1.0, 2.0):
        ours = softened_kl(h_t, h_s, mask, temp, head=head, chunk=3)
        ref = softened_kl(full(h_t), full(h_s), mask, temp).double()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6) and ours.item() > 1e-3
        (g_ours,), (g_ref,) = torch.autograd.grad(ours, h_s), torch.autograd.grad(ref, h_s)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-8)


REFUSED = {
    "qwen3_moe": r"mixture-of-experts MLP \(mlp\.experts\)",
    "mixtral": r"mixture-of-experts MLP",
    "gpt_oss": r"mixture-of-experts MLP",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_fits_no_placement_is_refused_in_one_line_and_left_whole(name):
    import transformers as tf
    from transformers import AutoModelForCausalLM

    config = {"qwen3_moe": lambda: tf.Qwen3MoeConfig(**BASE), "mixtral": lambda: tf.MixtralConfig(**BASE),
              "gpt_oss": lambda: tf.GptOssConfig(**BASE),
              }[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match=REFUSED[name]) as err:
        NPTModel.convert(model, "all", rank=4)
    assert "\n" not in str(err.value)
    assert not any(hasattr(layer, "adapter") for layer in decoder_layers(model))
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_sdpa_loads_with_eager_attention_by_default_and_refuses_sdpa(tmp_path, micro_teacher):
    """Gemma 2 has no SDPA attention in transformers: `auto` (the default) loads it with eager
    attention through the same from_pretrained path as a hub id; asking for sdpa names the fix."""
    import shutil

    from npt.errors import NPTError
    from npt.loading import load_model

    llama_folder = micro_teacher[0]
    folder = tmp_path / "gemma2"
    _model("gemma2").save_pretrained(folder)
    for f in llama_folder.glob("*token*"):
        shutil.copy(f, folder)
    model, _ = load_model(str(folder), "float32", "cpu")
    assert model.config._attn_implementation == "eager"
    NPTModel.convert(model, "all", rank=4)  # and it converts, the proof included
    with pytest.raises(NPTError, match=r"has no SDPA attention.*Pass --attn_implementation eager"):
        load_model(str(folder), "float32", "cpu", attn_implementation="sdpa")
    llama, _ = load_model(str(llama_folder), "float32", "cpu")
    assert llama.config._attn_implementation == "sdpa"
