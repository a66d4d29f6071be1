"""Held-out evaluation against hand computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_adapters, tiny_model

from npt.capture import capture_teacher
from npt.evaluate import evaluate, greedy_match, leading_matches
from npt.model import NPTModel


@pytest.mark.parametrize("chunk_tokens", [None, 3])
def test_evaluation_matches_a_hand_computation_with_padding(chunk_tokens, monkeypatch):
    if chunk_tokens:  # logits formed 3 tokens at a time, as a big vocabulary would be
        monkeypatch.setattr("npt.kl.kl_chunk_tokens", lambda vocab, device: chunk_tokens)
    npt = NPTModel.convert(tiny_model(seed=1), "0,2", rank=4)
    randomize_adapters(npt)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 128, (5, 12), generator=g)
    mask = torch.ones_like(x)
    mask[1, 9:] = 0  # right padding on two rows
    mask[3, 5:] = 0
    res = evaluate(npt, x, batch_size=2, attention_mask=mask)

    real = mask.bool()
    with torch.no_grad():
        records, t_logits = capture_teacher(npt, x, mask, with_logits=True)
        s_logits = npt(input_ids=x, attention_mask=mask).logits
    for k, idx in enumerate([0, 2]):
        layer, rec = npt.npt_layers[idx], records[idx]
        with torch.no_grad():
            s, _ = layer.npt_output(rec.inputs, rec.attn)
        err = sum(((s[b, t] - rec.outputs[b, t]) ** 2).sum() for b in range(5) for t in range(12) if real[b, t])
        upd = sum(((rec.outputs[b, t] - rec.inputs[b, t]) ** 2).sum() for b in range(5) for t in range(12) if real[b, t])
        cos = [F.cosine_similarity(s[b, t] - rec.inputs[b, t], rec.outputs[b, t] - rec.inputs[b, t], dim=0) for b in range(5) for t in range(12) if real[b, t]]
        assert res.rel_error[k] == pytest.approx(math.sqrt(err / upd), rel=1e-5)
        assert res.update_cosine[k] == pytest.approx(float(sum(cos) / len(cos)), rel=1e-5)
    kl, t_nll, s_nll, agree, n = 0.0, 0.0, 0.0, 0, 0
    block_kl, block_agree = [], []
    for b in range(5):
        kl_b, agree_b, n_b = 0.0, 0, 0
        for t in range(11):
            if real[b, t] and real[b, t + 1]:
                p = F.softmax(t_logits[b, t].double(), -1)
                q = F.softmax(s_logits[b, t].double(), -1)
                kl_b += float((p * (p.log() - q.log())).sum())
                t_nll -= float(p[x[b, t + 1]].log())
                s_nll -= float(q[x[b, t + 1]].log())
                agree_b += int(t_logits[b, t].argmax() == s_logits[b, t].argmax())
                n_b += 1
        kl, agree, n = kl + kl_b, agree + agree_b, n + n_b
        block_kl.append(kl_b / n_b)
        block_agree.append(agree_b / n_b)
    assert res.tokens == n == 5 * 11 - 3 - 7
    assert 0 < agree < n  # the random adapters change some argmax tokens, not all
    assert res.top1_agreement == pytest.approx(agree / n)
    assert res.kl == pytest.approx(kl / n, rel=1e-4)
    # standard errors over the 5 blocks: each block's mean is one sample. A KL of 1e-3 nats formed
    # in float32 from terms of order 1 is good to about 1e-4 relative, and the variance of 5 blocks
    # spread by 17% of their mean magnifies that: 2e-3 allows for it and still tells n - 1 from n (25%)
    for value, samples in ((res.kl_stderr, block_kl), (res.top1_stderr, block_agree)):
        mean = sum(samples) / 5
        assert value == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in samples) / 4 / 5), rel=2e-3)
    assert res.teacher_ppl == pytest.approx(math.exp(t_nll / n), rel=1e-5)
    assert res.student_ppl == pytest.approx(math.exp(s_nll / n), rel=1e-5)


@pytest.mark.parametrize("modulate", ["gate", "gate,up,down"])
def test_zeroed_adapters_give_the_attention_dropped_models_perplexity(modulate):
    npt = NPTModel.convert(tiny_model(seed=2), "all", rank=4, modulate=modulate)
    randomize_adapters(npt, seed=3)
    zeroed = 0
    with torch.no_grad():
        for layer in npt.npt_layers.values():
            for name, p in layer.adapter.named_parameters():  # no modulation: the NPT layer is h + MLP(Norm2(h))
                if "B_f" in name or "gain" in name:
                    p.zero_()
                    zeroed += 1
    assert zeroed == 3 * {"gate": 3, "gate,up,down": 7}[modulate]  # B_f and the gain's two tensors of gate (and up), down's B_f
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    res = evaluate(npt, x)
    dropped = tiny_model(seed=2)  # the same teacher with every attention output forced to zero
    with torch.no_grad():
        for layer in dropped.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        logits = dropped(input_ids=x).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
    assert res.student_ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert res.teacher_ppl != pytest.approx(res.student_ppl)


def test_sample_generations_show_teacher_and_student():
    from npt.teachers import train_tokenizer

    tok = train_tokenizer(["some text to learn a few merges from"] * 20, 128)
    npt = NPTModel.convert(tiny_model(seed=3, vocab_size=len(tok)), "all", rank=4)
    randomize_adapters(npt, seed=4, scale=1.0)
    blocks = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    _, samples = greedy_match(npt, tok, blocks, num_prompts=2, prompt_len=8, new_tokens=6)
    assert len(samples) == 2 and all(set(s) == {"prompt", "teacher", "student", "identical_tokens"} for s in samples)
    assert samples[0]["prompt"] == tok.decode(blocks[0, :8], skip_special_tokens=True)
    assert any(s["teacher"] != s["student"] for s in samples)


def _exact_student(seed: int = 5) -> NPTModel:
    """A teacher whose attention outputs are zero: its NPT student with B_f = 0 computes exactly
    the teacher's h + MLP(Norm2(h)), whatever A and B_m hold."""
    model = tiny_model(seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    npt = NPTModel.convert(model, "all", rank=4)
    return npt


class _Tok:
    pad_token_id = 0

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_an_exact_student_agrees_everywhere_matches_every_greedy_token_and_has_zero_kl():
    npt = _exact_student()
    x = torch.randint(1, 128, (16, 40), generator=torch.Generator().manual_seed(2))
    res = evaluate(npt, x, batch_size=8)
    assert res.top1_agreement == 1.0 and res.kl == pytest.approx(0.0, abs=1e-6) and res.ppl_ratio == pytest.approx(1.0, rel=1e-5)
    match, samples = greedy_match(npt, _Tok(), x, num_prompts=16, prompt_len=32, new_tokens=32)
    assert match == 32.0 and len(samples) == 16 and all(s["teacher"] == s["student"] for s in samples)


def _greedy_by_hand(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding without a cache, one full forward per token (EOS never stops it)."""
    ids = prompt[None]
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, prompt.shape[0]:].tolist()


def test_greedy_match_of_a_perturbed_student_equals_a_hand_count():
    npt = NPTModel.convert(tiny_model(seed=6), "all", rank=4)
    randomize_adapters(npt, seed=7, scale=0.3)
    x = torch.randint(1, 128, (6, 24), generator=torch.Generator().manual_seed(3))
    match, samples = greedy_match(npt, _Tok(), x, num_prompts=6, prompt_len=10, new_tokens=12)
    hand = []
    for row in x[:, :10]:
        with npt.teacher_mode():
            t = _greedy_by_hand(npt, row, 12)
        s = _greedy_by_hand(npt, row, 12)
        same = next((i for i, (a, b) in enumerate(zip(t, s)) if a != b), 12)
        hand.append(same)
    assert [smp["identical_tokens"] for smp in samples] == hand
    assert match == pytest.approx(sum(hand) / 6) and 0 < match < 12
    assert leading_matches(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 9, 4]])).tolist() == [2]


def test_layer_attribution_reverts_each_layer_and_converts_each_alone():
    """Against models converted on the layer subsets themselves (same adapters): reverting layer 0
    of a "0,2" student is the student converted at 2 only, and so on; a single converted layer
    reverted is the teacher (KL 0)."""
    from npt.evaluate import layer_attribution

    x = torch.randint(1, 128, (4, 10), generator=torch.Generator().manual_seed(3))
    npt = NPTModel.convert(tiny_model(seed=1), "0,2", rank=4)
    randomize_adapters(npt)
    rows = layer_attribution(npt, x, batch_size=2)
    assert [r["layer"] for r in rows] == [0, 2]
    assert all(layer.npt_enabled for layer in npt.npt_layers.values())  # restored
    by_layer, state = {r["layer"]: r for r in rows}, npt.adapter_state_dict()
    for keep, other in ((0, 2), (2, 0)):
        single = NPTModel.convert(tiny_model(seed=1), str(keep), rank=4)
        single.load_adapter_state_dict({k: v for k, v in state.items() if k.startswith(f"layers.{keep}.")})
        res = evaluate(single, x, batch_size=2)
        assert by_layer[keep]["kl_alone"] == pytest.approx(res.kl, rel=1e-5) and res.kl > 1e-4
        assert by_layer[other]["kl_reverted"] == pytest.approx(res.kl, rel=1e-5)
        assert by_layer[other]["ratio_reverted"] == pytest.approx(res.ppl_ratio, rel=1e-5)
        assert layer_attribution(single, x, batch_size=2)[0]["kl_reverted"] == pytest.approx(0.0, abs=1e-6)
