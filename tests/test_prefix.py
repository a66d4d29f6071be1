"""The student starts from the teacher's hidden state below its lowest converted layer: the same
numbers, bit for bit, without computing the layers below again."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapters, tiny_model

from npt.capture import Prefix, capture_teacher, run_student, starting_at
from npt.evaluate import evaluate
from npt.losses import LossConfig, NPTLoss
from npt.model import NPTModel
from npt.objective import EquivalenceObjective


def _student(layers: str = "3-4", kind: str = "llama"):
    npt = NPTModel.convert(tiny_model(kind, num_hidden_layers=5), layers)
    randomize_adapters(npt, seed=1)
    return npt


def _padded_batch():
    x = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return x, mask


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_student_started_from_the_teachers_prefix_computes_the_same_bits(kind):
    npt = _student(kind=kind)
    x, mask = _padded_batch()
    records, _ = capture_teacher(npt, x, mask)
    prefix = Prefix.of(npt, records)
    assert prefix.layer == 3 and prefix.hidden is records[3].inputs
    for asked in ({"with_logits": True}, {"with_final_hidden": True}, {}):
        full, out_full = run_student(npt, x, mask, **asked)
        reused, out_reused = run_student(npt, x, mask, prefix=prefix, **asked)
        for idx in (3, 4):
            assert torch.equal(full[idx].outputs, reused[idx].outputs)
            assert torch.equal(full[idx].attn, reused[idx].attn)
        if asked:
            assert torch.equal(out_full, out_reused)


def test_the_layers_below_are_skipped_and_restored():
    npt = _student()
    x, mask = _padded_batch()
    records, _ = capture_teacher(npt, x, mask)
    calls = []
    layers = npt.model.model.layers
    handles = [getattr(layers[i], 'layer', layers[i]).self_attn.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(5)]
    run_student(npt, x, mask, with_logits=True, prefix=Prefix.of(npt, records))
    assert calls == [3, 4]  # the three teacher layers below were not run again
    calls.clear()
    run_student(npt, x, mask, with_logits=True)
    assert calls == [0, 1, 2, 3, 4]
    for h in handles:
        h.remove()
    assert all("forward" not in layers[i].__dict__ for i in range(3))  # the skip is undone
    with pytest.raises(ValueError, match="boom"), starting_at(npt.model, Prefix.of(npt, records)):
        raise ValueError("boom")
    assert all("forward" not in layers[i].__dict__ for i in range(3))
    # the lowest layer converted: nothing to reuse
    assert Prefix.of(_student("0,4"), records) is None


def test_a_free_running_step_and_the_evaluation_are_unchanged_by_the_reuse(monkeypatch):
    x, mask = _padded_batch()
    grads = []
    for reuse in (True, False):
        npt = _student()
        obj = EquivalenceObjective(npt, NPTLoss(LossConfig(logit_kl_weight=1.0, free_running_layer_weight=0.5), 2))
        obj.reuse_prefix = reuse
        out = obj(x, mask, step=3, free_running=True)
        out.objective.backward()
        grads.append((out.objective.detach(), [p.grad.clone() for p in npt.adapter_parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))

    npt = _student()
    blocks = torch.randint(3, 128, (5, 12), generator=torch.Generator().manual_seed(2))
    reused = evaluate(npt, blocks, batch_size=2)
    monkeypatch.setattr(Prefix, "of", classmethod(lambda cls, npt_model, records: None))
    full = evaluate(npt, blocks, batch_size=2)
    assert reused.record() == full.record()
