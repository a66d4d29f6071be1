"""The NPT layer, conversion, one copy of the weights, teacher capture, causality and padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_adapters, tiny_model

from npt.architecture import decoder_layers
from npt.capture import capture_teacher
from npt.errors import NPTError, UnsupportedArchitectureError
from npt.layer import NPTAdapter
from npt.model import NPTModel


def hand_mlp(layer, x, gate_delta=None):
    """SwiGLU MLP written out by hand from the layer's weights: W_d(silu(W_g x + delta) * W_u x)."""
    mlp = layer.mlp
    gate = x @ mlp.gate_proj.weight.T
    if gate_delta is not None:
        gate = gate + gate_delta
    return (F.silu(gate) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def hand_rmsnorm(norm, h):
    return norm.weight * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def test_zero_adapter_output_is_attention_dropped():
    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    layer = npt.npt_layers[1]
    h = torch.randn(2, 5, 32)
    attn = torch.randn(2, 5, 32)
    out, frob2 = layer.npt_output(h, attn)  # a fresh adapter has B_f = 0
    expected = h + hand_mlp(layer.layer, hand_rmsnorm(layer.layer.post_attention_layernorm, h))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(frob2 == 0)


@pytest.mark.parametrize("modulate", ["gate", "gate,up", "gate,up,down"])
@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("rank,num_ranks,bottleneck_bias,adapter_input",  # the regulariser's two evaluations (n >= r, n < r)
                         [(3, 2, False, "attention"), (12, 1, False, "attention"), (3, 2, True, "attention"), (3, 2, True, "relative")])
def test_known_delta_gives_hand_computed_modulated_mlp(modulate, mlp_bias, rank, num_ranks, bottleneck_bias, adapter_input):
    """Every modulated matrix materialised per token, which the layer never does: the output
    h + (W_d + dW_d) act((W_g + dW_g) x + b_g) * ((W_u + dW_u) x + b_u) + b_d, with the gains
    scaling W x and not the biases, and the regulariser the sum of ||dW||_F^2 over the matrices."""
    torch.manual_seed(1)
    npt = NPTModel.convert(tiny_model(mlp_bias=mlp_bias), "all", rank=rank, num_ranks=num_ranks, modulation_scale=0.7, modulate=modulate,
                           bottleneck_bias=bottleneck_bias, adapter_input=adapter_input)
    layer = npt.npt_layers[0]
    ad = layer.adapter
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.3)
    h, attn = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    out, frob2 = layer.npt_output(h, attn)
    x = hand_rmsnorm(layer.layer.post_attention_layernorm, h)
    mlp = layer.layer.mlp
    for t in range(4):
        seen = attn[0, t] / h[0, t].pow(2).mean().sqrt() if adapter_input == "relative" else attn[0, t]  # a / rms(h), or a
        z = ad.c_a * ad.A.weight @ seen + (ad.z_bias if bottleneck_bias else 0.0)

        def delta(mod, weight, d_in, d_out):  # gamma W + s sum_j v_f[j] v_m[j]^T
            v_m = (mod.c_m * mod.B_m.weight @ z).view(num_ranks, d_in)
            v_f = (mod.c_f * mod.B_f.weight @ z).view(num_ranks, d_out)
            gamma = mod.gain.bias + mod.gain.weight[0] @ z / rank**0.5 if mod.gain is not None else 0.0
            return gamma * weight + 0.7 * sum(torch.outer(v_f[j], v_m[j]) for j in range(num_ranks))

        zero = torch.zeros(())
        d_g = delta(ad, mlp.gate_proj.weight, 32, 64)
        d_u = delta(ad.up, mlp.up_proj.weight, 32, 64) if ad.up is not None else 0 * mlp.up_proj.weight
        d_d = delta(ad.down, mlp.down_proj.weight, 64, 32) if ad.down is not None else 0 * mlp.down_proj.weight
        b_g, b_u, b_d = (p.bias if mlp_bias else zero for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        y = F.silu((mlp.gate_proj.weight + d_g) @ x[0, t] + b_g) * ((mlp.up_proj.weight + d_u) @ x[0, t] + b_u)
        expected = h[0, t] + (mlp.down_proj.weight + d_d) @ y + b_d
        torch.testing.assert_close(out[0, t], expected, rtol=1e-4, atol=1e-5)
        total = sum(d.pow(2).sum() for d in (d_g, d_u, d_d))
        torch.testing.assert_close(frob2[0, t], total, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.call("regularizer", h, attn)[0, t], total, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("modulate", ["gate", "gate,up,down"])
def test_without_a_bottleneck_bias_the_modulation_is_even_in_the_attention_output(modulate):
    """Each rank-1 term is the product of two linear functions of z = c_a A a, so without a gain
    the NPT layer gives a and -a the same output; the bias e in z = c_a A a + e breaks that."""
    h, attn = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    outputs = {}
    for bias in (False, True):
        torch.manual_seed(2)
        npt = NPTModel.convert(tiny_model(num_hidden_layers=1), "all", rank=4, num_ranks=2, modulate=modulate, gate_gain=False,
                               bottleneck_bias=bias)
        randomize_adapters(npt, seed=4, scale=0.5)
        layer = npt.npt_layers[0]
        assert (layer.adapter.z_bias is not None) == bias
        outputs[bias] = [layer.npt_output(h, sign * attn)[0] for sign in (1, -1)]
    plus, minus = outputs[False]
    torch.testing.assert_close(plus, minus, rtol=1e-5, atol=1e-6)
    plus, minus = outputs[True]
    assert (plus - minus).abs().max() > 1e-2


def test_a_relative_adapter_input_makes_the_mlp_branch_blind_to_the_residual_scale_as_the_teachers_is():
    """The teacher's MLP reads Norm_f(h + a): scaling h and a together leaves its MLP branch as it
    is. The NPT layer's x = Norm_f(h) is blind to that scale too, but its bottleneck reads a; with
    --adapter_input relative it reads a / rms(h), and the branch out - h is unchanged again."""
    h, attn = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    branches = {}
    for adapter_input in ("attention", "relative"):
        npt = NPTModel.convert(tiny_model(num_hidden_layers=1), "all", rank=4, num_ranks=2, adapter_input=adapter_input)
        randomize_adapters(npt, seed=4, scale=0.5)
        layer = npt.npt_layers[0]
        with torch.no_grad():
            teacher = [layer.teacher_output(c * h, c * attn) - c * (h + attn) for c in (1.0, 3.0)]
            branches[adapter_input] = [layer.npt_output(c * h, c * attn)[0] - c * h for c in (1.0, 3.0)]
    torch.testing.assert_close(teacher[0], teacher[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(*branches["relative"], rtol=1e-4, atol=1e-5)
    assert (branches["attention"][0] - branches["attention"][1]).abs().max() > 1e-2
    with pytest.raises(NPTError, match="--adapter_input 'residual'"):
        NPTModel.convert(tiny_model(), "all", adapter_input="residual")


def test_a_gain_of_one_doubles_the_gate_weights_not_the_gate_bias():
    """Llama with mlp_bias: gamma = 1 gives 2 W_g x + b_g (and with up modulated, 2 W_u x + b_u)."""
    for modulate in ("gate", "gate,up"):
        torch.manual_seed(0)
        npt = NPTModel.convert(tiny_model(mlp_bias=True, num_hidden_layers=1), "all", rank=3, num_ranks=2, modulate=modulate)
        layer = npt.npt_layers[0]
        with torch.no_grad():
            for mod in (layer.adapter, layer.adapter.up):
                if mod is not None:
                    mod.gain.bias.fill_(1.0)
            layer.layer.mlp.gate_proj.bias.normal_(0, 1.0)
        h, attn = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
        out, _ = layer.npt_output(h, attn)
        mlp, x = layer.layer.mlp, layer.mlp_input(h)
        up = 2 * x @ mlp.up_proj.weight.T + mlp.up_proj.bias if modulate == "gate,up" else mlp.up_proj(x)
        expected = h + mlp.down_proj(F.silu(2 * x @ mlp.gate_proj.weight.T + mlp.gate_proj.bias) * up)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_calibration_gives_unit_rms_and_keeps_attention_dropped_start():
    ad = NPTAdapter(32, 64, rank=4, num_ranks=2, scale=1.0)
    x, attn, gate = torch.randn(100, 32) * 3, torch.randn(100, 32) * 0.01, torch.randn(100, 64) * 0.2
    weights = {k: v.clone() for k, v in ad.named_parameters()}
    ad.calibrate_(x, attn, gate)
    v_m, v_f = ad.vectors(attn)
    z = ad.c_a * ad.A(attn)
    assert z.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
    coef = torch.einsum("nkd,nd->nk", v_m, x)
    assert coef.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)
    # a B_f of unit entries would move the gate by about its own RMS (0.2): c_f = RMS(gate) / sqrt(k r)
    assert ad.c_f.item() == pytest.approx(gate.pow(2).mean().sqrt().item() / (2 * 4) ** 0.5, rel=1e-5)
    assert torch.all(v_f == 0)
    # only the multipliers changed: the weights keep the unit scale Adam's steps are measured against
    for k, v in ad.named_parameters():
        assert torch.equal(v, weights[k]), k
    assert ad.A.weight.std().item() == pytest.approx(1.0, abs=0.2) and ad.B_m.weight.std().item() == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_conversion_of_llama_family(kind):
    model = tiny_model(kind)
    n_base = sum(p.numel() for p in model.parameters())
    npt = NPTModel.convert(model, "upper_half", rank=4)
    assert npt.npt_config.layers == [1, 2] and npt.npt_config.model_type == kind
    trainable = {n for n, p in npt.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    # One copy of the weights: the base parameters are the same tensors, only adapters were added.
    assert sum(p.numel() for p in npt.parameters()) == n_base + sum(p.numel() for p in npt.adapter_parameters())
    x = torch.randint(0, 128, (2, 7))
    out = npt(input_ids=x).logits
    assert out.shape == (2, 7, 128) and torch.isfinite(out).all()


def test_teacher_mode_is_the_original_model():
    reference = tiny_model(seed=3)
    npt = NPTModel.convert(tiny_model(seed=3), "all", rank=4)
    with torch.no_grad():
        for p in npt.adapter_parameters():
            p.normal_()  # teacher mode must ignore the adapters completely
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad(), npt.teacher_mode():
        ours = npt(input_ids=x).logits
    torch.testing.assert_close(ours, reference(input_ids=x).logits, rtol=0, atol=0)
    assert all(layer.npt_enabled for layer in npt.npt_layers.values())  # restored after the block


def test_layer_selection_and_bad_layers():
    assert NPTModel.convert(tiny_model(), "0,2", rank=2).npt_config.layers == [0, 2]
    assert NPTModel.convert(tiny_model(), "lower_half", rank=2).npt_config.layers == [0]
    with pytest.raises(NPTError, match="names layer"):
        NPTModel.convert(tiny_model(), "5", rank=2)
    with pytest.raises(NPTError, match="rank"):
        NPTModel.convert(tiny_model(), "all", rank=0)
    with pytest.raises(NPTError, match="rank"):
        NPTModel.convert(tiny_model(), "all", rank=33)


def test_unsupported_architecture_is_refused_with_the_missing_part():
    from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="model.model.layers"):
        NPTModel.convert(gpt2)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    with pytest.raises(UnsupportedArchitectureError, match=r"mixture-of-experts MLP \(mlp\.experts\)"):
        NPTModel.convert(moe)


def test_captured_targets_are_each_layers_own_output_before_the_final_norm():
    model = tiny_model()
    layers = decoder_layers(model)
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o)) for i, layer in enumerate(layers)]
    x = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    npt = NPTModel.convert(model, "all", rank=4)
    records, _ = capture_teacher(npt, x)
    for i in range(3):
        torch.testing.assert_close(records[i].outputs, seen[i], rtol=0, atol=0)
        torch.testing.assert_close(records[i].inputs, hidden[i], rtol=0, atol=0)
    # HF's last hidden_states entry has the final norm applied; the target must not.
    assert (records[2].outputs - hidden[3]).abs().max() > 0.1
    # a_i really is the attention output: h + a + MLP(Norm2(h + a)) reproduces t.
    layer = npt.npt_layers[1].layer
    r = records[1]
    mid = r.inputs + r.attn
    torch.testing.assert_close(mid + hand_mlp(layer, hand_rmsnorm(layer.post_attention_layernorm, mid)), r.outputs, rtol=1e-5, atol=1e-5)


def test_capture_stops_after_the_last_converted_layer():
    npt = NPTModel.convert(tiny_model(), "0", rank=2)
    calls = []
    decoder_layers(npt.model)[2].register_forward_hook(lambda *a: calls.append(1))
    records, _ = capture_teacher(npt, torch.randint(0, 128, (1, 4)))
    assert list(records) == [0] and calls == []


def _student_outputs(npt, x, mask=None):
    """Teacher-forced student outputs of every converted layer."""
    records, _ = capture_teacher(npt, x, mask)
    return {i: layer.npt_output(records[i].inputs, records[i].attn)[0] for i, layer in npt.npt_layers.items()}


def test_causality_teacher_forced_and_free_running():
    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    randomize_adapters(npt)
    x = torch.randint(0, 128, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 17) % 128  # change only later tokens
    with torch.no_grad():
        sx, sy = _student_outputs(npt, x), _student_outputs(npt, y)
        fx, fy = npt(input_ids=x).logits, npt(input_ids=y).logits
    for i in sx:
        torch.testing.assert_close(sx[i][:, :6], sy[i][:, :6], rtol=0, atol=1e-6)
        assert (sx[i][:, 6:] - sy[i][:, 6:]).abs().max() > 1e-3  # later positions do change
    torch.testing.assert_close(fx[:, :6], fy[:, :6], rtol=0, atol=1e-6)
    assert (fx[:, 6:] - fy[:, 6:]).abs().max() > 1e-3


def test_padding_changes_nothing_for_real_tokens():
    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    randomize_adapters(npt, seed=1)
    x = torch.randint(1, 128, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)  # left padding
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    right = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # right padding
    rmask = torch.cat([torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    # Left padding shifts positions; give the real tokens the same position ids as unpadded.
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        plain = _student_outputs(npt, x)
        records, _ = capture_teacher(npt, right, rmask)
        for i, layer in npt.npt_layers.items():
            s, _ = layer.npt_output(records[i].inputs, records[i].attn)
            torch.testing.assert_close(s[:, :7], plain[i], rtol=1e-5, atol=1e-5)
        free = npt(input_ids=x).logits
        free_left = npt(input_ids=padded, attention_mask=mask, position_ids=pos).logits
        free_right = npt(input_ids=right, attention_mask=rmask).logits
    torch.testing.assert_close(free_left[:, 3:], free, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(free_right[:, :7], free, rtol=1e-4, atol=1e-4)


def test_free_running_generate_uses_npt_layers_and_cache():
    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    randomize_adapters(npt, seed=2)
    prompt = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        cached = npt.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = npt.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        with npt.teacher_mode():
            teacher = npt.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, teacher)  # strong random adapters change the continuation



def test_fused_mlp_tail_gradient_equals_autograds():
    torch.manual_seed(0)
    npt = NPTModel.convert(tiny_model(), "all", rank=4, num_ranks=2, modulate="gate")  # the fused tail is the gate-only path
    randomize_adapters(npt, seed=5)
    layer = npt.npt_layers[1]
    h, attn = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    out, _ = layer.npt_output(h, attn)  # h needs no grad: the fused path
    assert type(out.grad_fn).__name__ == "AddBackward0" and "GatedDown" in type(out.grad_fn.next_functions[1][0]).__name__
    weights = torch.randn_like(out)
    fused = torch.autograd.grad((out * weights).sum(), list(layer.adapter.parameters()))
    # the generic graph: the same computation written with plain autograd ops
    mlp, x = layer.layer.mlp, layer.layer.post_attention_layernorm(h)
    gate, *_ = layer.adapter("modulate_inputs", x, attn, mlp.gate_proj(x), mlp.up_proj(x), layer.projection_weights())
    ref = h + mlp.down_proj(mlp.act_fn(gate) * mlp.up_proj(x))
    torch.testing.assert_close(out, ref)
    generic = torch.autograd.grad((ref * weights).sum(), list(layer.adapter.parameters()))
    for a, b in zip(fused, generic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("free_running", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(free_running):
    from npt.losses import LossConfig, NPTLoss
    from npt.objective import EquivalenceObjective

    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        npt = NPTModel.convert(tiny_model(seed=6), "all", rank=4, num_ranks=2)
        randomize_adapters(npt, seed=8)
        npt.set_gradient_checkpointing(ckpt)
        obj = EquivalenceObjective(npt, NPTLoss(LossConfig(), 3))
        obj(x, None, step=10**6, free_running=free_running).objective.backward()
        grads.append([p.grad.clone() for p in npt.adapter_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("modulate,adapter_input", [("gate", "attention"), ("gate,up", "attention"), ("gate,up,down", "attention"),
                                                    ("gate,up,down", "relative")])
def test_injection_folds_the_delta_of_every_modulated_matrix(modulate, adapter_input):
    """npt-inject's delta at one position is that token's dW of each modulated matrix (its squared
    norms add up to the regulariser the layer computes there, by another route), and it is added
    to exactly those matrices of the plain model."""
    from npt.capture import run_student
    from npt.inject import add_to_weights, context_deltas

    torch.manual_seed(0)
    npt = NPTModel.convert(tiny_model(), "all", rank=3, num_ranks=2, modulate=modulate, bottleneck_bias=True, adapter_input=adapter_input)
    randomize_adapters(npt, seed=6, scale=0.3)
    x = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    deltas = context_deltas(npt, x, [1], [6])
    assert list(deltas[1]) == modulate.split(",")
    with torch.no_grad():
        records, _ = run_student(npt, x)
        frob2 = npt.npt_layers[1].call("regularizer", records[1].inputs, records[1].attn)[0, 6]
    torch.testing.assert_close(sum(d.pow(2).sum() for d in deltas[1].values()), frob2, rtol=1e-4, atol=1e-6)
    model = npt.unload()
    mlp = model.model.layers[1].mlp
    weights = {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight}
    before = {name: w.detach().clone() for name, w in weights.items()}
    add_to_weights(model, deltas, alpha=0.5)
    for name, w in weights.items():
        expected = before[name] + 0.5 * deltas[1][name] if name in deltas[1] else before[name]
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)
