"""Held-out evaluation against hand computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_adapters, tiny_model

from npt.capture import capture_teacher
from npt.evaluate import evaluate, sample_generations
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
    kl, t_nll, s_nll, n = 0.0, 0.0, 0.0, 0
    for b in range(5):
        for t in range(11):
            if real[b, t] and real[b, t + 1]:
                p = F.softmax(t_logits[b, t].double(), -1)
                q = F.softmax(s_logits[b, t].double(), -1)
                kl += float((p * (p.log() - q.log())).sum())
                t_nll -= float(p[x[b, t + 1]].log())
                s_nll -= float(q[x[b, t + 1]].log())
                n += 1
    assert res.tokens == n == 5 * 11 - 3 - 7
    assert res.kl == pytest.approx(kl / n, rel=1e-4)
    assert res.teacher_ppl == pytest.approx(math.exp(t_nll / n), rel=1e-5)
    assert res.student_ppl == pytest.approx(math.exp(s_nll / n), rel=1e-5)


def test_zeroed_adapters_give_the_attention_dropped_models_perplexity():
    npt = NPTModel.convert(tiny_model(seed=2), "all", rank=4)
    randomize_adapters(npt, seed=3)
    with torch.no_grad():
        for layer in npt.npt_layers.values():
            layer.adapter.B_f.weight.zero_()  # no modulation: the NPT layer is h + MLP(Norm2(h))
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
    samples = sample_generations(npt, tok, blocks, num=2, prompt_len=8, new_tokens=6)
    assert len(samples) == 2 and all(set(s) == {"prompt", "teacher", "student"} for s in samples)
    assert samples[0]["prompt"] == tok.decode(blocks[0, :8], skip_special_tokens=True)
    assert any(s["teacher"] != s["student"] for s in samples)
