"""Every model converts exactly or is refused; the converted model behaves as a model should
(hidden states, gradient checkpointing with the gradient penalty)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapters, tiny_model

from npt.architecture import decoder_layers
from npt.errors import UnsupportedArchitectureError
from npt.losses import LossConfig, NPTLoss
from npt.model import NPTModel
from npt.objective import EquivalenceObjective

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(name: str):
    import transformers as tf

    return {
        "bitnet": lambda: tf.BitNetConfig(**BASE),
        "stablelm, parallel residual": lambda: tf.StableLmConfig(**BASE, use_parallel_residual=True),
        "stablelm": lambda: tf.StableLmConfig(**BASE, use_parallel_residual=False),
        "gemma": lambda: tf.GemmaConfig(**BASE, head_dim=8),
        # its Mamba mixer at the size of the rest (the defaults' 128 heads x state 256 take seconds to run)
        "falcon_h1": lambda: tf.FalconH1Config(**BASE, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8),
        **{name: (lambda cls=cls: getattr(tf, cls)(**BASE)) for name, cls in PLAIN.items()},
    }[name]()


# families built from BASE alone
PLAIN = {"qwen3": "Qwen3Config", "smollm3": "SmolLM3Config", "olmo": "OlmoConfig", "exaone": "ExaoneConfig",
         "internlm3": "InternLM3Config", "ernie4_5": "Ernie4_5Config", "cohere": "CohereConfig", "llama4_text": "Llama4TextConfig",
         "nemotron": "NemotronConfig", "apertus": "ApertusConfig", "arcee": "ArceeConfig", "starcoder2": "Starcoder2Config"}


# what each architecture does with the NPT formula, and where the refusal must point (the other
# placements, fused gate-up, residual multipliers and experts: test_families.py)
ARCHITECTURES = {
    "bitnet": r"decoder layer 0: a fresh NPT layer on input h \+ a differs",
    "stablelm, parallel residual": r"lacks post_attention_layernorm",
    "stablelm": None,  # LayerNorm instead of RMSNorm, otherwise a Llama layer: converts exactly
    "gemma": None,  # (1 + w) RMSNorm, GeLU, scaled embeddings: all inside modules the NPT layer calls
    **dict.fromkeys(["qwen3", "smollm3", "olmo", "exaone", "internlm3", "ernie4_5"]),  # Llama's placement
    "cohere": r"lacks post_attention_layernorm, which is no known placement",  # parallel attention and MLP
    "llama4_text": r"lacks mlp, mlp\.down_proj",  # feed_forward, mostly experts
    "falcon_h1": r"lacks mlp, mlp\.down_proj",
    **dict.fromkeys(["nemotron", "apertus", "arcee", "starcoder2"], r"lacks .*mlp\.gate_proj"),  # MLPs without a gate
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_architecture_converts_exactly_or_is_refused_before_training(name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name)).eval()
    x = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=x).logits
    expected = ARCHITECTURES[name]
    if expected is not None:
        with pytest.raises(UnsupportedArchitectureError, match=expected):
            NPTModel.convert(model, "all", rank=4)
        # refused before anything changed: the model is whole, trainable as it was, and computes the same
        assert not any(hasattr(layer, "adapter") for layer in decoder_layers(model))
        assert all(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)
        return
    npt = NPTModel.convert(model, "all", rank=4)
    with torch.no_grad(), npt.teacher_mode():
        torch.testing.assert_close(npt(input_ids=x).logits, before, rtol=0, atol=0)
    # the fresh student is the teacher with attention dropped, layer by layer, as the formula says
    layer = npt.npt_layers[1].layer
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        out, _ = npt.npt_layers[1].npt_output(h, torch.randn(2, 5, 32))
        torch.testing.assert_close(out, h + layer.mlp(layer.post_attention_layernorm(h)), rtol=1e-5, atol=1e-6)
    # and it trains
    obj = EquivalenceObjective(npt, NPTLoss(LossConfig(), 2))
    obj(x, None, step=0).objective.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in npt.adapter_parameters())


def test_the_proof_would_catch_a_layer_that_differs_only_numerically(monkeypatch):
    """A layer whose output is off by a small relative amount (here 1e-3, ten times float32's
    tolerance) is refused: the check compares values, not names."""
    model = tiny_model(seed=4)
    layer = decoder_layers(model)[2]
    cls_forward = type(layer).forward
    monkeypatch.setattr(layer, "forward", lambda h, *a, **k: h + (cls_forward(layer, h, *a, **k) - h) * 1.001)
    with pytest.raises(UnsupportedArchitectureError, match=r"decoder layer 2: its output rebuilt .* differs .* by 0\.000999 relative"):
        NPTModel.convert(model, "all", rank=4)


@pytest.mark.parametrize("layers", ["all", "1"])
def test_output_hidden_states_in_npt_mode_are_each_layers_output(layers):
    npt = NPTModel.convert(tiny_model(seed=5), layers, rank=4)
    randomize_adapters(npt, scale=0.1)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i, layer in enumerate(decoder_layers(npt.model))]
    with torch.no_grad():
        states = npt(input_ids=x, output_hidden_states=True).hidden_states
        embeddings = npt.model.model.embed_tokens(x)
    for h in hooks:
        h.remove()
    # HF's convention: L + 1 states, the embeddings first and the final norm applied to the last
    assert len(states) == 4
    torch.testing.assert_close(states[0], embeddings)
    torch.testing.assert_close(states[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(states[2], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(states[3], npt.model.model.norm(outputs[2]))
    with torch.no_grad(), npt.teacher_mode():
        teacher_states = npt(input_ids=x, output_hidden_states=True).hidden_states
        reference = tiny_model(seed=5)(input_ids=x, output_hidden_states=True).hidden_states
    for ours, ref in zip(teacher_states, reference, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("free_running", [False, True])
def test_gradient_checkpointing_with_the_gradient_penalty_under_sdpa(free_running):
    """The penalty runs layer j under SDPA's math kernel (double backward); the checkpoint's
    recomputation in the outer backward must use the same kernel."""
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        npt = NPTModel.convert(tiny_model(seed=6), "all", rank=4, num_ranks=2)
        randomize_adapters(npt, seed=8, scale=0.1)
        npt.set_gradient_checkpointing(ckpt)
        assert npt.model.config._attn_implementation == "sdpa"
        obj = EquivalenceObjective(npt, NPTLoss(LossConfig(use_gradient_penalty=True), 3), seed=0)
        out = obj(x, None, step=10**6, free_running=free_running)
        assert out.metrics["grad_penalty"] > 0
        out.objective.backward()
        grads.append(torch.cat([p.grad.flatten() for p in npt.adapter_parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)
