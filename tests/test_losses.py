"""The loss suite against hand-computed values, schedules, adaptive weights, gradient penalty, scale."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import randomize_adapters, tiny_model

from npt.capture import capture_teacher
from npt.errors import NPTError
from npt.losses import LOSSES, LayerTensors, LossConfig, NPTLoss, register_loss
from npt.model import NPTModel
from npt.objective import EquivalenceObjective
from npt.optim import OptimArguments
from npt.schedules import curriculum_factor, distill_temperature, lr_factor
from npt.weighting import AdaptiveLayerWeights

S = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
T = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
H = torch.tensor([[0.0, 1.0], [1.0, 0.0]])


def layer(normalize: bool = False) -> LayerTensors:
    energy = (T - H).pow(2).mean() if normalize else torch.tensor(1.0)
    return LayerTensors(S.clone(), T.clone(), H.clone(), energy)


def test_registry_has_the_guide_losses_and_one_function_adds_one():
    assert {"improved_npt", "focal_mse", "smooth_l1_mse", "mse"} <= set(LOSSES)

    @register_loss("test_l1")
    def l1(lt, cfg, temperature):
        return lt.error(temperature).abs().mean()

    try:
        loss = NPTLoss(LossConfig(loss_type="test_l1"), 1)
        out = loss([layer()], torch.zeros(1), None, step=10**6)
        assert out.metrics["alignment"].item() == pytest.approx((1 + 0 + 1 + 2) / 4)
    finally:
        del LOSSES["test_l1"]
    with pytest.raises(NPTError, match="'nope' is not a registered loss"):
        LossConfig(loss_type="nope")


def test_formulas_against_hand_computed_values():
    # e = S - T = [[1, 0], [-1, -2]], e^2 = [1, 0, 1, 4]
    cfg = LossConfig(mse_weight=0.8, cosine_weight=0.2, focal_gamma=2.0, smooth_beta=1.0, cosine_on="update")
    lt = layer()
    mse = (1 + 0 + 1 + 4) / 4
    assert LOSSES["mse"](lt, cfg, 1.0).item() == pytest.approx(mse)
    assert LOSSES["mse"](lt, cfg, 2.0).item() == pytest.approx(mse / 4)  # temperature: MSE / T^2
    # cosine on updates: S-h = [[1,1],[-1,-1]], T-h = [[0,1],[0,1]]
    cos = [1 / math.sqrt(2), -1 / math.sqrt(2)]
    cos_dist = sum(1 - c for c in cos) / 2
    assert LOSSES["improved_npt"](lt, cfg, 1.0).item() == pytest.approx(0.8 * mse + 0.2 * cos_dist)
    hidden = LossConfig(cosine_on="hidden", mse_weight=0.0, cosine_weight=1.0)
    cos_h = [(1 * 0 + 2 * 2) / (math.sqrt(5) * 2), (0 * 1 + -1 * 1) / (1 * math.sqrt(2))]
    assert LOSSES["improved_npt"](lt, hidden, 1.0).item() == pytest.approx(sum(1 - c for c in cos_h) / 2)
    # focal: mean(e^2^(gamma/2) * e^2) = mean(e^4) for gamma 2
    assert LOSSES["focal_mse"](lt, cfg, 1.0).item() == pytest.approx((1 + 0 + 1 + 16) / 4)
    # smooth L1 (beta 1): |e| < 1 -> 0.5 e^2, else |e| - 0.5: [0.5, 0, 0.5, 1.5]
    sm = LossConfig(mse_weight=0.5, smooth_beta=1.0)
    assert LOSSES["smooth_l1_mse"](lt, sm, 1.0).item() == pytest.approx(0.5 * mse + 0.5 * (0.5 + 0 + 0.5 + 1.5) / 4)
    # normalisation: errors in units of the teacher update, E = mean((T - h)^2) = (0 + 1 + 0 + 1) / 4
    assert LOSSES["mse"](layer(normalize=True), cfg, 1.0).item() == pytest.approx(mse / 0.5)


@pytest.mark.parametrize("normalization", ["update", "none"])
def test_logged_mse_is_the_update_normalised_ratio_for_every_normalisation(normalization):
    """loss/mse is ||S - T||^2 / ||T - h||^2 whatever the loss's own unit; the loss itself is raw
    with normalization none."""
    from npt.objective import EquivalenceObjective

    npt = NPTModel.convert(tiny_model(seed=3), "all", rank=4)
    randomize_adapters(npt, seed=2, scale=0.1)
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    cfg = LossConfig(loss_type="mse", loss_normalization=normalization)
    obj = EquivalenceObjective(npt, NPTLoss(cfg, 3))
    out = obj(x, None, step=0)
    records, _ = capture_teacher(npt, x)
    ratios, raws = [], []
    with torch.no_grad():
        for idx, layer in npt.npt_layers.items():
            s, _ = layer.npt_output(records[idx].inputs, records[idx].attn)
            t, h = records[idx].outputs, records[idx].inputs
            ratios.append(((s - t) ** 2).sum() / ((t - h) ** 2).sum())
            raws.append(((s - t) ** 2).mean())
    assert out.metrics["mse"].item() == pytest.approx(sum(ratios).item() / 3, rel=1e-5)
    expected_loss = sum(ratios) / 3 if normalization == "update" else sum(raws) / 3
    assert out.metrics["alignment"].item() == pytest.approx(expected_loss.item(), rel=1e-5)


def test_focal_gradient_treats_the_weight_as_a_constant():
    lt = layer()
    lt.student.requires_grad_(True)
    LOSSES["focal_mse"](lt, LossConfig(focal_gamma=2.0), 1.0).backward()
    e = (S - T)
    torch.testing.assert_close(lt.student.grad, e.pow(2) * 2 * e / 4)  # d/dS [w e^2] with w = e^2 fixed


def test_loss_module_combines_terms_with_curriculum():
    cfg = LossConfig(loss_type="mse", regularization_lambda=0.1, gradient_penalty_lambda=0.5, use_gradient_penalty=True)
    loss = NPTLoss(cfg, 2, curriculum_steps=100)
    layers = [layer(), LayerTensors(S * 2, T, H, torch.tensor(1.0))]
    reg, gp = torch.tensor([1.0, 3.0]), torch.tensor(4.0)
    out = loss(layers, reg, gp, step=0)
    l0, l1 = 6 / 4, ((2 - 0) ** 2 + 2**2 + 1 + 9) / 4
    c, temp = 0.5, 3.0
    assert out.curriculum_factor == c and out.temperature == temp
    alignment = (l0 + l1) / 2 / temp**2
    assert out.metrics["alignment"].item() == pytest.approx(alignment)
    assert out.metrics["total"].item() == pytest.approx(alignment + c * 0.1 * 2.0 + c * 0.5 * 4.0)
    assert out.metrics["mse"].item() == pytest.approx((l0 + l1) / 2)  # logged without temperature
    assert out.metrics["layer_weight"].tolist() == [0.5, 0.5]
    late = loss(layers, reg, gp, step=100)
    assert late.curriculum_factor == 1.0 and late.temperature == 1.0
    assert late.metrics["total"].item() == pytest.approx((l0 + l1) / 2 + 0.1 * 2.0 + 0.5 * 4.0)
    # running freely, the per-layer terms weigh --free_running_layer_weight (the KL carries the rest)
    scaled = NPTLoss(dataclasses.replace(cfg, free_running_layer_weight=0.25), 2, curriculum_steps=100)
    free = scaled(layers, reg, gp, step=100, logit_kl=torch.tensor(2.0), free_running=True)
    assert free.metrics["total"].item() == pytest.approx(0.25 * (l0 + l1) / 2 + 0.1 * 2.0 + 0.5 * 4.0 + 1.0 * 2.0)
    assert free.metrics["alignment"].item() == pytest.approx((l0 + l1) / 2)  # logged unweighted
    forced = scaled(layers, reg, gp, step=100)
    assert forced.metrics["total"].item() == late.metrics["total"].item()


def test_curriculum_and_temperature_schedules():
    W = 200
    cs = [curriculum_factor(s, W) for s in range(0, 2 * W)]
    assert cs[0] == 0.5 and curriculum_factor(W, W) == 1.0 and curriculum_factor(3 * W, W) == 1.0
    assert all(b >= a for a, b in zip(cs, cs[1:]))
    for s in (25, 50, 100, 150):  # cosine shape
        assert curriculum_factor(s, W) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * (1 - s / W))))
    assert curriculum_factor(W // 2, W) == pytest.approx(0.75)
    assert distill_temperature(0.5, 3.0) == 3.0 and distill_temperature(1.0, 3.0) == 1.0
    assert distill_temperature(curriculum_factor(W // 2, W), 5.0) == pytest.approx(3.0)
    temps = [distill_temperature(c, 3.0) for c in cs]
    assert all(b <= a for a, b in zip(temps, temps[1:]))
    assert curriculum_factor(5, 0) == 1.0
    # learning rate: warm-up then cosine to min ratio
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(100, 10, 100) == pytest.approx(0.1) and lr_factor(55, 10, 100) == pytest.approx(0.55)
    # wsd: warm-up, the peak until the last 20 steps, then linear to the min ratio
    assert [lr_factor(s, 10, 100, "wsd", 0.1, 20) for s in (9, 10, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_factor(90, 10, 100, "wsd", 0.1, 20) == pytest.approx(0.55) and lr_factor(100, 10, 100, "wsd", 0.1, 20) == pytest.approx(0.1)


def _train_weights(losses: torch.Tensor, steps: int, naive: bool) -> AdaptiveLayerWeights:
    torch.manual_seed(0)
    w = AdaptiveLayerWeights(len(losses))
    opt = torch.optim.AdamW(w.parameters(), lr=OptimArguments().adaptive_weights_lr, weight_decay=0.0)
    for _ in range(steps):
        noisy = losses * (1 + 0.1 * torch.randn(len(losses))).clamp_min(0.5)
        j = (w.weights() * noisy).sum() if naive else w.balance_loss(noisy)
        opt.zero_grad()
        j.backward()
        opt.step()
    return w


def test_adaptive_weights_balance_eight_layers_spanning_100x():
    losses = torch.logspace(-3, -1, 8)  # 100x between the smallest and largest layer loss
    w = _train_weights(losses, 1000, naive=False)
    p = w.weights().detach()
    contributions = p * losses
    assert p.min() > 1e-3 and p.max() < 0.9  # no weight collapses
    assert contributions.max() / contributions.min() < 2.0  # balanced
    assert w.temperature.item() > 0
    # The guide's naive version (weights trained on the weighted loss) collapses onto the easiest layer.
    naive = _train_weights(losses, 1000, naive=True).weights().detach()
    assert naive.max() > 0.9


def test_adaptive_weights_do_not_touch_adapter_gradients():
    loss = NPTLoss(LossConfig(loss_type="mse", use_adaptive_weights=True), 2)
    s = S.clone().requires_grad_(True)
    out = loss([LayerTensors(s, T, H, torch.tensor(1.0)), LayerTensors(2 * S, T, H, torch.tensor(1.0))], torch.zeros(2), None, step=10**6)
    out.objective.backward()
    p = loss.adaptive.weights().detach()
    torch.testing.assert_close(s.grad, p[0] * 2 * (S - T) / 4)  # stopgrad(p) * dMSE/dS
    assert loss.adaptive.layer_weights.grad.abs().sum() > 0


def _objective(seed: int = 0):
    torch.manual_seed(0)
    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    randomize_adapters(npt, seed=5, scale=0.2)
    loss = NPTLoss(LossConfig(loss_type="mse", use_gradient_penalty=True), 3)
    return EquivalenceObjective(npt, loss, seed=seed)


def _penalty(obj, x, alpha=None):
    from npt.capture import capture_teacher

    records, _ = capture_teacher(obj.npt, x)
    students = {i: lay.npt_output(records[i].inputs, records[i].attn)[0] for i, lay in obj.npt.npt_layers.items()}
    tensors = obj.layer_tensors(students, records, None)
    return obj.gradient_penalty(records, students, tensors, None, alpha), tensors


def test_gradient_penalty_does_not_depend_on_batch_size():
    obj = _objective()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    alpha = torch.rand(2, 12, 1, generator=torch.Generator().manual_seed(2))
    small, _ = _penalty(obj, x, alpha)
    big, _ = _penalty(obj, x.repeat(16, 1), alpha.repeat(16, 1, 1))  # batch x sequence grows 16x
    assert small.item() > 1e-3
    assert abs(big.item() - small.item()) / small.item() < 0.10
    # With fresh random tokens and draws (not copies), the value stays within 10% too.
    r1, _ = _penalty(obj, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3)))
    r16, _ = _penalty(obj, torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(4)))
    assert abs(r16.item() - r1.item()) / r1.item() < 0.10


def test_gradient_penalty_gradient_is_not_parallel_to_the_alignment_gradient():
    obj = _objective()
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    gp, tensors = _penalty(obj, x)
    params = list(obj.npt.adapter_parameters())
    g_gp = torch.cat([g.flatten() for g in torch.autograd.grad(gp, params, retain_graph=True)])
    align = torch.stack([LOSSES["mse"](t, obj.loss.cfg, 1.0) for t in tensors.values()]).mean()
    g_al = torch.cat([g.flatten() for g in torch.autograd.grad(align, params)])
    cos = torch.nn.functional.cosine_similarity(g_gp, g_al, dim=0).item()
    assert g_gp.norm() > 0 and abs(cos) < 0.95, cos


def _scaled_teacher(model, factor: float):
    """The same function with every residual-stream state multiplied by `factor`: embeddings,
    attention output and MLP output projections scale; RMSNorm undoes it everywhere else."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(factor)
        for lay in model.model.layers:
            lay.self_attn.o_proj.weight.mul_(factor)
            lay.mlp.down_proj.weight.mul_(factor)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach() / factor, requires_grad=False)
    return model


def _train_rel_errors(model, blocks, normalization: str, calibrated: bool, steps: int = 60, lr: float = 3e-3):
    from npt.evaluate import evaluate
    from npt.objective import calibrate_adapters

    npt = NPTModel.convert(model, "all", rank=8)
    obj = EquivalenceObjective(npt, NPTLoss(LossConfig(loss_type="mse", loss_normalization=normalization), 3))
    if calibrated:
        calibrate_adapters(npt, blocks[:8])
    before = evaluate(npt, blocks[-8:]).rel_error
    opt = torch.optim.AdamW(list(npt.adapter_parameters()), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = blocks[torch.randint(0, len(blocks) - 8, (8,), generator=g)]
        out = obj(x, None, step=10**6)
        opt.zero_grad()
        out.objective.backward()
        opt.step()
    return before, evaluate(npt, blocks[-8:]).rel_error


@pytest.mark.slow
def test_a_layer_with_tiny_hidden_states_still_trains(trained_teacher_dir):
    """Hidden-state RMS ~0.01 (the regime where plain MSE's first gradients fall below Adam's eps):
    with the scale-free loss and calibrated adapters every layer learns; plain MSE on the same
    teacher leaves every layer where it started."""
    from npt.data import DataArguments, heldout_blocks, open_source
    from npt.loading import load_model

    spec = DataArguments(max_length=64, eval_blocks=40, eval_fraction=0.05)
    results = {}
    for normalization, calibrated in (("update", True), ("none", False)):
        model, tok = load_model(str(trained_teacher_dir), "float32", "cpu")
        blocks = heldout_blocks(open_source(spec), tok, spec)
        _scaled_teacher(model, 1e-2)
        rms = {}
        hook = model.model.layers[0].register_forward_hook(lambda m, a, o: rms.__setitem__("h", o.pow(2).mean().sqrt().item()))
        with torch.no_grad():
            model(input_ids=blocks[:2])
        hook.remove()
        assert rms["h"] < 0.05
        results[normalization] = _train_rel_errors(model, blocks, normalization, calibrated)
    before, after = results["update"]
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)  # every layer, the first included
    before, after = results["none"]
    assert all(abs(a - b) < 0.01 * b for a, b in zip(after, before)), (before, after)


def test_free_running_student_chains_npt_layers_and_trains_across_layers():
    from npt.capture import run_student

    torch.manual_seed(0)
    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    randomize_adapters(npt, seed=7, scale=0.2)
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    records, logits = run_student(npt, x, with_logits=True)
    # by hand: each NPT layer gets the previous NPT layer's output
    model = npt.model.model
    h = model.embed_tokens(x)
    pos = torch.arange(10)[None]
    emb = model.rotary_emb(h, pos)
    for i, layer in npt.npt_layers.items():
        a = layer.attention(h, attention_mask=None, position_embeddings=emb, position_ids=pos)
        h, f2 = layer.npt_output(h, a)
        torch.testing.assert_close(records[i].outputs, h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(records[i].attn, a, rtol=1e-5, atol=1e-5)  # the student's own attention output
        torch.testing.assert_close(layer.call("regularizer", records[i].inputs, records[i].attn), f2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, npt(input_ids=x).logits, rtol=1e-5, atol=1e-5)

    # A loss on the last layer alone reaches the first layer's adapter only when running freely.
    obj = EquivalenceObjective(npt, NPTLoss(LossConfig(loss_type="mse"), 3))

    def first_adapter_grad(free: bool) -> float:
        for p in npt.adapter_parameters():
            p.grad = None
        LOSSES["mse"](_last_layer_tensors(obj, x, free), obj.loss.cfg, 1.0).backward()
        grad = npt.npt_layers[0].adapter.B_f.weight.grad
        return 0.0 if grad is None else grad.abs().sum().item()

    assert first_adapter_grad(True) > 0 and first_adapter_grad(False) == 0


def _last_layer_tensors(obj, x, free):
    from npt.capture import capture_teacher, run_student

    records, _ = capture_teacher(obj.npt, x)
    if free:
        s = run_student(obj.npt, x)[0][2].outputs
    else:
        s, _ = obj.npt.npt_layers[2].npt_output(records[2].inputs, records[2].attn)
    return obj.layer_tensors({2: s}, records, None)[2]


def test_softened_kl_against_hand_computation():
    from npt.kl import softened_kl

    t = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    s = torch.tensor([[[1.0, 1.0, -1.0], [0.0, 1.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    for temp in (1.0, 2.0):
        p, q = torch.softmax(t[0, 0] / temp, -1), torch.softmax(s[0, 0] / temp, -1)
        expected = temp**2 * (p * (p.log() - q.log())).sum()
        assert softened_kl(t, s, mask, temp).item() == pytest.approx(expected.item(), rel=1e-6)
        reverse = temp**2 * (q * (q.log() - p.log())).sum()
        assert abs(reverse - expected) > 0.01  # the two directions differ here, so the share is seen
        for b in (0.25, 1.0):
            assert softened_kl(t, s, mask, temp, reverse_share=b).item() == pytest.approx(((1 - b) * expected + b * reverse).item(), rel=1e-6)
    assert softened_kl(t, t, None, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    assert softened_kl(t, t, None, 3.0, reverse_share=0.5).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("chunk,reverse_share", [(3, 0.0), (None, 0.0), (3, 0.3), (4, 1.0)])
def test_chunked_kl_from_hidden_states_equals_the_full_logits_kl(chunk, reverse_share):
    """Value and gradient of the fused, chunked KL against `softened_kl` on full logits, with
    padding and a chunk size that does not divide the number of real tokens."""
    from npt.kl import LogitHead, softened_kl

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(6, 11, bias=True, dtype=torch.float64)
    with torch.no_grad():  # drawn from the test's own generator, not the global one (whose state depends on the tests before)
        head.weight.copy_(torch.randn(11, 6, dtype=torch.float64, generator=g) / 6**0.5)
        head.bias.copy_(torch.randn(11, dtype=torch.float64, generator=g) * 0.1)
    h_t = torch.randn(2, 5, 6, dtype=torch.float64, generator=g)
    h_s = torch.randn(2, 5, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    for temp in (1.0, 2.5):
        ours = softened_kl(h_t, h_s, mask, temp, head=LogitHead(head.weight, head.bias), chunk=chunk, reverse_share=reverse_share)
        ref = softened_kl(head(h_t).detach(), head(h_s), mask, temp, reverse_share=reverse_share).double()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6) and ours.item() > 0.01  # both in float32
        (g_ours,), (g_ref,) = torch.autograd.grad(2 * ours, h_s), torch.autograd.grad(2 * ref, h_s)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
        assert g_ours[1, 3:].abs().sum() == 0  # padding gets no gradient
    assert head.weight.grad is None


def test_final_hidden_state_through_the_head_gives_the_models_logits():
    from npt.capture import capture_teacher, run_student

    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    randomize_adapters(npt, seed=2, scale=0.2)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    head = npt.model.get_output_embeddings()
    _, t_final = capture_teacher(npt, x, with_final_hidden=True)
    with npt.teacher_mode():
        torch.testing.assert_close(head(t_final), npt(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    _, s_final = run_student(npt, x, with_final_hidden=True)
    torch.testing.assert_close(head(s_final), npt(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_free_running_objective_adds_the_logit_kl_term():
    torch.manual_seed(0)
    npt = NPTModel.convert(tiny_model(), "all", rank=4)
    loss = NPTLoss(LossConfig(loss_type="mse", logit_kl_weight=0.5, free_running_layer_weight=1.0), 3)
    obj = EquivalenceObjective(npt, loss)
    x = torch.randint(0, 128, (2, 8))
    free = obj(x, None, step=5, free_running=True)
    forced = obj(x, None, step=5, free_running=False)
    assert "logit_kl" in free.metrics and "logit_kl" not in forced.metrics
    assert free.metrics["logit_kl"].item() > 0
    assert free.metrics["total"].item() == pytest.approx(
        free.metrics["alignment"].item() + 0.01 * free.metrics["regularization"].item() + 0.5 * free.metrics["logit_kl"].item(), rel=1e-5)
    # the default: the per-layer terms weigh 0 in free-running steps (still computed and logged)
    default = EquivalenceObjective(npt, NPTLoss(LossConfig(loss_type="mse", logit_kl_weight=0.5), 3))(x, None, step=5, free_running=True)
    assert default.metrics["alignment"].item() == pytest.approx(free.metrics["alignment"].item(), rel=1e-6)
    assert default.metrics["total"].item() == pytest.approx(
        0.01 * free.metrics["regularization"].item() + 0.5 * free.metrics["logit_kl"].item(), rel=1e-5)


@pytest.mark.parametrize("modulate", ["gate", "gate,up,down"])
def test_free_running_local_layer_terms_compare_each_layer_with_its_teacher_layer_on_the_same_input(modulate):
    """--free_running_layer_target local: layer i's term is ||S_i - T_i||^2 / ||T_i - h_i||^2 with
    S_i the NPT layer and T_i its teacher layer, both on the free-running pass's own h_i and a_i;
    the per-layer terms send no gradient to the layers below."""
    from npt.capture import run_student

    torch.manual_seed(0)
    # without the bottleneck bias: these random adapters (drawn before it existed) are the ones
    # whose trajectory terms exceed the local ones by the margin asserted below
    npt = NPTModel.convert(tiny_model(), "all", rank=4, num_ranks=2, modulate=modulate, bottleneck_bias=False)
    randomize_adapters(npt, seed=1, scale=1.0)
    cfg = LossConfig(loss_type="mse", logit_kl_weight=0.0, free_running_layer_weight=1.0, regularization_lambda=0.0,
                     free_running_layer_target="local")
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    out = EquivalenceObjective(npt, NPTLoss(cfg, 3))(x, None, step=5, free_running=True)
    with torch.no_grad():
        runs, _ = run_student(npt, x)
        hand = []
        for idx, rec in runs.items():
            layer = npt.npt_layers[idx]
            s, t = layer.npt_output(rec.inputs, rec.attn)[0], layer.teacher_output(rec.inputs, rec.attn)
            hand.append(((s - t) ** 2).mean() / ((t - rec.inputs) ** 2).mean())
    assert out.metrics["layer_mse"].tolist() == pytest.approx([v.item() for v in hand], rel=1e-5)
    assert out.metrics["alignment"].item() == pytest.approx(torch.stack(hand).mean().item(), rel=1e-5)
    # the trajectory target differs (layer i answers for the layers below too) ...
    trajectory = EquivalenceObjective(npt, NPTLoss(dataclasses.replace(cfg, free_running_layer_target="trajectory"), 3))(
        x, None, step=5, free_running=True)
    assert all(a > 1.01 * b for a, b in zip(trajectory.metrics["layer_mse"][1:].tolist(), out.metrics["layer_mse"][1:].tolist()))
    # ... and the local terms train each layer for its own error only: the lowest layer's term is
    # the only one that reaches its adapter
    out.objective.backward()
    first = [p.grad.clone() for p in npt.npt_layers[0].adapter.parameters()]
    npt.zero_grad()
    rec, lowest = runs[0], npt.npt_layers[0]
    with torch.no_grad():
        t = lowest.teacher_output(rec.inputs, rec.attn)
    s = lowest.npt_output(rec.inputs, rec.attn)[0]
    (((s - t) ** 2).mean() / ((t - rec.inputs) ** 2).mean() / 3).backward()  # its term, in the mean over the 3 layers
    for a, b in zip(first, [p.grad for p in npt.npt_layers[0].adapter.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("on", ["update", "hidden"])
def test_cosine_distance_value_and_gradient_match_autograd(on):
    from npt.losses import cosine_distance

    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    t, h = torch.randn(7, 5, dtype=torch.float64, generator=g), torch.randn(7, 5, dtype=torch.float64, generator=g)
    ours = cosine_distance(LayerTensors(s, t, h, torch.tensor(1.0)), on)
    u, v = (s - h, t - h) if on == "update" else (s, t)
    ref = (1 - torch.nn.functional.cosine_similarity(u, v, dim=-1)).mean()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, s), torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_the_pair_grams_backward_is_autograds_own():
    """The regulariser's Gram blocks use a symmetric product's backward (one GEMM): its gradient
    equals autograd's through the plain einsum of every pair."""
    from npt.layer import _pair_gram

    w = torch.randn(5, 7, 3, dtype=torch.float64, requires_grad=True)
    a, b = torch.triu_indices(5, 5)
    weights = torch.randn(9, len(a), dtype=torch.float64)
    reference = torch.einsum("jnr,lns->jlrs", w, w)[a, b].flatten(1).transpose(0, 1)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), w)
    got = _pair_gram(w, a, b)
    (grad,) = torch.autograd.grad((got * weights).sum(), w)
    torch.testing.assert_close(got, reference)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("r,n", [(6, 20), (6, 3)])  # the two evaluations: many forms (z_i z_j), few (Q_c z)
def test_the_regularisers_quadratic_forms_and_their_gradients_are_exact(r, n):
    """z^T Q_c z per token and column, with gradients to z and to the forms, against the plain
    einsum, for non-symmetric Q_c."""
    from npt.layer import quadratic_forms

    z = torch.randn(4, 5, r, dtype=torch.float64, requires_grad=True)
    forms = torch.randn(r * r, n, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 5, n, dtype=torch.float64)
    reference = torch.einsum("...i,ijc,...j->...c", z, forms.view(r, r, n), z)
    grads_ref = torch.autograd.grad((reference * weights).sum(), (z, forms))
    got = quadratic_forms(z, forms)
    grads = torch.autograd.grad((got * weights).sum(), (z, forms))
    torch.testing.assert_close(got, reference)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("rank,num_ranks", [(4, 3), (16, 1)])  # both evaluations of the quadratic forms
def test_the_regulariser_under_bfloat16_autocast_is_close_to_float32s(rank, num_ranks):
    """Under CPU bf16 autocast (the adapter's matmuls, z among them, in bf16) the regulariser
    stays within bf16's error of float32's, by either evaluation of its quadratic forms."""
    from npt.layer import NPTAdapter

    torch.manual_seed(0)
    ad = NPTAdapter(32, 64, rank, num_ranks, 0.7, True, ("gate", "up", "down"))
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.3)
    attn = torch.randn(2, 5, 32)
    weights = {"gate": (torch.randn(64, 32), None), "up": (torch.randn(64, 32), None)}
    exact = ad.regularizer(attn, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ad.regularizer(attn, weights)
    torch.testing.assert_close(low.float(), exact, rtol=3e-2, atol=0)


@pytest.mark.parametrize("free_running", [False, True])
def test_a_step_under_bfloat16_autocast_trains_like_float32(free_running):
    """--mixed_precision bf16 on CPU: the step runs, its gradients stay float32 and point where
    float32's do."""
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = {}
    for dtype in (None, torch.bfloat16):
        npt = NPTModel.convert(tiny_model(), "all")
        randomize_adapters(npt, seed=3, scale=0.1)
        obj = EquivalenceObjective(npt, NPTLoss(LossConfig(logit_kl_weight=1.0), 3))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = obj(x, None, step=5, free_running=free_running)
        out.objective.backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in npt.adapter_parameters()])
    assert grads[torch.bfloat16].dtype == torch.float32 and grads[torch.bfloat16].isfinite().all()
    assert torch.nn.functional.cosine_similarity(grads[None], grads[torch.bfloat16], dim=0) > 0.98


def test_under_autocast_the_logit_head_is_cast_once_per_step():
    """LogitHead.of under bf16 autocast holds the weight in bf16 (autocast would cast the whole
    [vocab, d] matrix again in every chunk); outside autocast, the model's own weight."""
    from npt.kl import LogitHead

    model = tiny_model()
    assert LogitHead.of(model).weight is model.lm_head.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head = LogitHead.of(model)
    assert head.weight.dtype == torch.bfloat16 and torch.equal(head.weight, model.lm_head.weight.to(torch.bfloat16))
