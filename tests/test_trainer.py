"""GCA-HNG's networks (GCAHNG) and their alternating optimisation (AlternatingTrainer)."""

import copy
import math

import pytest
import torch

from gca_pyg.errors import NonFiniteLossError
from gca_pyg.graph import BatchGraph, to_dense_edges
from gca_pyg.losses import synthetic_npair_loss
from gca_pyg.model import GCAHNG
from gca_pyg.schema import LossConfig, NetConfig, OptimConfig
from gca_pyg.trainer import AlternatingTrainer, adamw_options

from dense_synthesis import synthesize_dense
from tiny_model import TinyBackbone, batch


def make_trainer(
    warmup_epochs=0, synthesis=True, amp_dtype=None, metric="npair", device="cpu", **optim
):
    torch.manual_seed(0)
    model = GCAHNG(
        TinyBackbone(),
        num_classes=6,
        embedding_size=16,
        net=NetConfig(num_layers=2, heads=4, dropout=0.1),
        loss=LossConfig(synthesis=synthesis, metric=metric),
        amp_dtype=amp_dtype,
    ).to(device)
    return AlternatingTrainer(model, OptimConfig(warmup_epochs=warmup_epochs, epochs=10, **optim))


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def parts(model):
    return {
        "backbone": model.backbone,
        "embedding": model.embedding,
        "net": model.generator.net,
        "classifier": model.generator.classifier,
        "proxies": model.criterion,
    }


def changed_parts(model, before):
    return {
        part
        for part, module in parts(model).items()
        if any(not torch.equal(p, before[part][name]) for name, p in module.named_parameters())
    }


def snapshots(model):
    return {part: snapshot(module) for part, module in parts(model).items()}


def record_optimizer_steps(trainer):
    """Wraps every optimiser's step to record, in order, which parts of the model it changed."""
    steps = []
    for name in ("metric_optimizer", "net_optimizer", "classifier_optimizer"):
        optimizer = getattr(trainer, name)

        def step(original=optimizer.step, name=name):
            before = snapshots(trainer.model)
            original()
            steps.append((name, changed_parts(trainer.model, before)))

        optimizer.step = step
    return steps


@pytest.mark.parametrize("metric", ["npair", "proxy_anchor"])
def test_each_update_changes_exactly_the_parameters_it_owns(metric):
    trainer = make_trainer(metric=metric)
    steps = record_optimizer_steps(trainer)
    trainer.training_step(*batch())
    metric_parts = {"backbone", "embedding"} | ({"proxies"} if metric == "proxy_anchor" else set())
    assert steps == [
        ("metric_optimizer", metric_parts),  # metric update: J_m + w J_syn + J_gce ...
        ("net_optimizer", {"net"}),  # ... which trains the net through J_gce
        ("classifier_optimizer", {"classifier"}),  # classifier update: J_cls
        ("net_optimizer", {"net"}),  # generator update: J_gen
    ]


def test_proxies_learn_100_times_faster_than_the_backbone():
    trainer = make_trainer(metric="proxy_anchor", metric_lr=2e-4)
    rates = {
        id(p): group["lr"]
        for group in trainer.metric_optimizer.param_groups
        for p in group["params"]
    }
    assert rates[id(trainer.model.criterion.proxies)] == pytest.approx(2e-2)
    assert all(rates[id(p)] == pytest.approx(2e-4) for p in trainer.model.backbone.parameters())


def test_the_generator_loss_reaches_neither_the_classifier_nor_the_embeddings():
    trainer = make_trainer()
    model = trainer.model
    images, labels = batch()
    model.train()
    embeddings = model(images)
    graph = trainer.batch_graph(labels)
    model.generator_loss(embeddings, graph, torch.rand(3, 2))["J_gen"].backward()
    assert all(p.grad is None for p in model.generator.classifier.parameters())  # J_ce: fixed W_s
    assert all(p.grad is None for p in model.backbone.parameters())  # detached embeddings
    assert all(p.grad is None for p in model.embedding.parameters())
    assert all(p.grad is not None for p in model.generator.net.convs.parameters())


def test_j_syn_trains_the_embeddings_through_the_synthetic_negatives_not_the_net():
    trainer = make_trainer()
    model = trainer.model
    images, labels = batch()
    graph = trainer.batch_graph(labels)
    model.train()
    model.generator.mean_metric_loss = 5.0 / math.log(1 / 0.4)  # hardness 0.4
    embeddings = model(images).detach().requires_grad_(True)
    mix = torch.rand(3, 2)
    torch.manual_seed(7)
    j_syn = model.metric_loss(embeddings, graph, mix)["J_syn"]
    (grad,) = torch.autograd.grad(j_syn, embeddings, retain_graph=True)
    net_grads = torch.autograd.grad(
        j_syn, list(model.generator.net.parameters()), allow_unused=True
    )
    assert all(g is None or not g.any() for g in net_grads)

    # The same J_syn from dense fusion weights, synthetic negatives differentiable in z.
    torch.manual_seed(7)
    _, fusion = model.generator.correlate(embeddings, graph, detach_fusion=True)
    dense = to_dense_edges(fusion, graph.shard.edge_index, labels.numel(), undirected=True)
    synthetic = synthesize_dense(embeddings, labels, dense, 0.4, mix=mix)
    expected = synthetic_npair_loss(embeddings, synthetic, graph)
    (expected_grad,) = torch.autograd.grad(expected, embeddings)
    assert torch.allclose(j_syn, expected)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    # Through the negatives alone the gradient is far from zero.
    detached = synthetic_npair_loss(
        embeddings,
        type(synthetic)(synthetic.embeddings.detach(), synthetic.anchor, synthetic.class_index),
        graph,
    )
    (detached_grad,) = torch.autograd.grad(detached, embeddings)
    assert (grad - detached_grad).abs().max() > 1e-3


def test_proxy_anchor_j_syn_trains_the_embeddings_through_the_synthetic_negatives():
    trainer = make_trainer(metric="proxy_anchor")
    model = trainer.model
    images, labels = batch()
    graph = trainer.batch_graph(labels)
    model.train()
    embeddings = model(images).detach().requires_grad_(True)
    negatives = model.generator(embeddings, graph, torch.rand(3, 2)).negatives
    j_syn = model.criterion.synthetic_loss(embeddings, negatives, graph)
    grad, proxy_grad = torch.autograd.grad(j_syn, [embeddings, model.criterion.proxies])
    # J_syn depends on the embeddings through the synthetic negatives alone: the backbone
    # learns from them, as from N-pair's; and it pushes the proxies.
    assert grad.abs().max() > 1e-3 and proxy_grad.abs().max() > 1e-3


@pytest.mark.parametrize("metric", ["npair", "proxy_anchor"])
def test_j_syn_enters_with_the_weight_of_the_generator_loss_schedule(metric):
    trainer = make_trainer(metric=metric)
    images, labels = batch()
    trainer.model.generator.mean_generator_loss = 20.0  # beta 20: w = 1 - 1/e
    assert trainer.synthetic_weight == pytest.approx(1 - math.exp(-1))
    logs = trainer.training_step(images, labels)
    assert logs["J_syn"] > 0.1
    expected = logs["J_m"] + logs["J_gce"] + (1 - math.exp(-1)) * logs["J_syn"]
    assert logs["J_metric"] == pytest.approx(expected, rel=1e-6)


def test_training_lowers_the_metric_loss_and_stays_finite(device):
    trainer = make_trainer(device=device)
    images, labels = batch()
    first = trainer.training_step(images, labels)
    expected_keys = {
        "J_m",
        "J_gce",
        "J_syn",
        "J_metric",
        "J_cls",
        "J_gen",
        "J_ce",
        "J_sim",
        "J_div",
    }
    assert set(first) == expected_keys
    logs = [first] + [trainer.training_step(images, labels) for _ in range(29)]
    assert all(torch.isfinite(torch.tensor(list(log.values()))).all() for log in logs)
    assert logs[-1]["J_m"] < 0.7 * first["J_m"]


def test_warmup_freezes_the_backbone_only():
    trainer = make_trainer(warmup_epochs=1)
    images, labels = batch()
    before = snapshots(trainer.model)
    trainer.training_step(images, labels)
    assert changed_parts(trainer.model, before) == {"embedding", "net", "classifier"}
    trainer.end_epoch()
    before = snapshots(trainer.model)
    trainer.training_step(images, labels)
    assert "backbone" in changed_parts(trainer.model, before)


def test_synthesis_off_is_the_same_model_without_generator():
    trainer = make_trainer(synthesis=False)
    images, labels = batch()
    before = snapshots(trainer.model)
    logs = trainer.training_step(images, labels)
    assert set(logs) == {"J_m", "J_gce", "J_metric", "J_cls"}
    assert logs["J_metric"] == pytest.approx(logs["J_m"] + logs["J_gce"], rel=1e-6)
    assert changed_parts(trainer.model, before) == {"backbone", "embedding", "net", "classifier"}


def test_end_epoch_rolls_running_means_and_schedules():
    trainer = make_trainer(metric_lr_step=1, metric_lr_gamma=0.5)
    generator = trainer.model.generator
    images, labels = batch()
    assert trainer.synthetic_weight == pytest.approx(0.0, abs=1e-4)
    assert trainer.hardness == pytest.approx(1.0, abs=1e-5)
    logs = [trainer.training_step(images, labels) for _ in range(3)]
    means = trainer.end_epoch()
    assert trainer.epoch == 1
    mean_metric_loss = sum(log["J_m"] for log in logs) / 3
    mean_generator_loss = sum(log["J_gen"] for log in logs) / 3
    assert generator.mean_metric_loss == pytest.approx(mean_metric_loss)
    assert generator.mean_generator_loss == pytest.approx(mean_generator_loss)
    assert trainer.hardness == pytest.approx(math.exp(-5.0 / mean_metric_loss))
    assert trainer.synthetic_weight == pytest.approx(1 - math.exp(-20.0 / mean_generator_loss))
    assert means["J_cls"] == pytest.approx(sum(log["J_cls"] for log in logs) / 3)
    assert set(means) == set(logs[0])
    assert trainer.metric_optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4 / 2)
    assert trainer.net_optimizer.param_groups[0]["lr"] < 1.5e-4
    assert 0 < trainer.synthetic_weight < 1 and 0 < trainer.hardness < 1


def test_epoch_means_span_a_resume_in_the_middle_of_the_epoch():
    trainer = make_trainer()
    images, labels = batch()
    logs = [trainer.training_step(images, labels)]
    resumed = make_trainer()
    resumed.model.load_state_dict(trainer.model.state_dict())
    resumed.load_state_dict(copy.deepcopy(trainer.state_dict()))
    logs += [resumed.training_step(images, labels) for _ in range(2)]
    means = resumed.end_epoch()
    assert means["J_m"] == pytest.approx(sum(log["J_m"] for log in logs) / 3)


def test_non_finite_loss_stops_before_any_update():
    trainer = make_trainer()
    images, labels = batch()
    images[0, 0] = float("nan")
    before = snapshots(trainer.model)
    with pytest.raises(NonFiniteLossError, match="J_metric became nan at epoch 1, iteration 1"):
        trainer.training_step(images, labels)
    assert changed_parts(trainer.model, before) == set()


def test_unbalanced_batch_fails_clearly():
    trainer = make_trainer()
    images, _ = batch()
    with pytest.raises(ValueError, match="class-balanced"):
        trainer.training_step(images, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]))


def test_training_state_round_trip_continues_identically(device, deterministic):
    trainer = make_trainer(device=device)
    images, labels = batch()
    for _ in range(2):
        trainer.training_step(images, labels)
    trainer.end_epoch()
    trainer.training_step(images, labels)

    resumed = make_trainer(device=device)
    resumed.model.load_state_dict(copy.deepcopy(trainer.model.state_dict()))
    resumed.load_state_dict(copy.deepcopy(trainer.state_dict()))
    torch.manual_seed(5)
    expected = trainer.training_step(images, labels)
    torch.manual_seed(5)
    actual = resumed.training_step(images, labels)
    assert actual == expected
    for (name, p), q in zip(trainer.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_moves_to_a_device_and_trains_there(device):
    torch.manual_seed(0)
    model = GCAHNG(TinyBackbone(), num_classes=6, embedding_size=16).to(device)
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0))
    images, labels = batch()
    logs = trainer.training_step(images, labels)  # inputs are moved to the model's device
    assert model.device.type == device.type
    assert all(torch.isfinite(torch.tensor(list(logs.values()))))


def test_embed_is_deterministic_and_keeps_the_mode():
    model = make_trainer().model
    images, _ = batch()
    model.train()
    first = model.embed(images)
    assert model.training and not first.requires_grad
    assert torch.equal(first, model.embed(images))
    assert first.shape == (12, 16)


def test_seeded_training_repeats_bit_for_bit(device, deterministic):
    def train_a_little():
        torch.manual_seed(3)
        model = GCAHNG(TinyBackbone(), num_classes=27, embedding_size=64).to(device)
        trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0))
        images = torch.randn(81, 20)
        labels = torch.arange(27).repeat_interleave(3)
        for _ in range(2):
            trainer.training_step(images, labels)
        return model.state_dict()

    first, second = train_a_little(), train_a_little()
    assert second.keys() == first.keys()
    for name, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(second[name], value), name
        else:  # the generator's schedule state
            assert second[name] == value, name


def test_adamw_is_fused_where_torch_has_fused_kernels_and_steps_like_the_plain_one():
    devices = ["meta", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in map(torch.device, devices):  # any device: options its AdamW accepts
        weight = torch.nn.Parameter(torch.ones(3, device=device))
        weight.grad = torch.ones(3, device=device)
        torch.optim.AdamW([weight], **adamw_options(device)).step()
    trainer, plain = make_trainer(), make_trainer()
    for name in ("metric_optimizer", "net_optimizer", "classifier_optimizer"):
        assert getattr(trainer, name).defaults["fused"]  # the CPU has fused AdamW kernels
        groups = [  # the same groups, hyperparameters and all, but the implementation
            {key: value for key, value in group.items() if key not in ("fused", "foreach")}
            for group in getattr(plain, name).param_groups
        ]
        setattr(plain, name, torch.optim.AdamW(groups, foreach=False))
        assert not any(group["fused"] for group in getattr(plain, name).param_groups)
    # The same gradients into both (a full step would compound rounding through its three updates
    # and Adam's normalisation of near-zero gradients), then one step of every optimiser.
    images, labels = batch()
    torch.manual_seed(5)
    model = trainer.model
    embeddings, graph = model(images), trainer.batch_graph(labels)
    total = model.metric_loss(embeddings, graph)["J_metric"]
    total = total + model.classifier_loss(embeddings.detach(), labels)["J_cls"]
    total = total + model.generator_loss(embeddings.detach(), graph)["J_gen"]
    total.backward()
    for p, q in zip(trainer.model.parameters(), plain.model.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    for name in ("metric_optimizer", "net_optimizer", "classifier_optimizer"):
        getattr(trainer, name).step()
        getattr(plain, name).step()
    for (name, p), q in zip(trainer.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_bf16_training_step_stays_close_to_fp32(device):
    images, labels = batch()
    fp32 = make_trainer(device=device)
    bf16 = make_trainer(amp_dtype=torch.bfloat16, device=device)
    for trainer in (fp32, bf16):
        trainer.model.generator.net.convs.apply(lambda m: setattr(m, "dropout", 0.0))
        trainer.model.generator.mean_metric_loss = 3.0
        trainer.model.generator.mean_generator_loss = 1.0
    expected, actual = fp32.training_step(images, labels), bf16.training_step(images, labels)
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=0.05, abs=0.02), name
    assert actual["J_gen"] != expected["J_gen"]  # autocast really ran in bf16
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_after_warmup_batchnorm_affine_parameters_train_while_statistics_stay_frozen():
    from gca_pyg.backbones import build_backbone

    torch.manual_seed(0)
    model = GCAHNG(
        build_backbone("small_cnn", pretrained="none", frozen_bn=True),
        num_classes=6,
        embedding_size=16,
        net=NetConfig(num_layers=1, heads=2),
    )
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=1))
    norm = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(4).repeat_interleave(2)
    statistics = norm.running_mean.clone()
    weight = norm.weight.detach().clone()
    trainer.training_step(images, labels)
    assert torch.equal(norm.weight, weight)  # warm-up: the backbone runs without gradients
    trainer.end_epoch()
    trainer.training_step(images, labels)
    assert not torch.equal(norm.weight, weight)  # gamma trains after warm-up
    assert torch.equal(norm.running_mean, statistics)  # the statistics stay frozen


@pytest.mark.parametrize("metric", ["npair", "proxy_anchor"])
def test_diagnostics_measure_without_changing_any_update(metric):
    images, labels = batch()
    plain, measured = make_trainer(metric=metric), make_trainer(metric=metric)
    measured.diagnostics = True
    final_logs = []
    for trainer in (plain, measured):
        torch.manual_seed(5)  # the net's dropout
        for _ in range(2):
            logs = trainer.training_step(images, labels)
        final_logs.append(logs)
    plain_logs, logs = final_logs
    for name, value in plain.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(measured.model.state_dict()[name], value), name
    assert {k: v for k, v in logs.items() if not k.startswith("diag_")} == plain_logs
    assert not any(name.startswith("diag_") for name in plain_logs)
    assert logs["diag_grad_z_J_m"] > 0 and logs["diag_grad_z_J_syn"] > 0
    if metric == "proxy_anchor":
        assert logs["diag_grad_proxies_J_m"] > 0 and logs["diag_grad_proxies_J_syn"] > 0
    else:
        assert "diag_grad_proxies_J_m" not in logs
    for name in ("anchor_proxy", "syn_anchor_proxy", "syn_own_proxy", "syn_anchor"):
        assert -1 <= logs[f"diag_cos_{name}"] <= 1


def test_the_diagnostics_are_the_gradients_and_cosines_they_name():
    trainer = make_trainer(metric="proxy_anchor")
    model = trainer.model
    images, labels = batch()
    model.generator.mean_generator_loss = 10.0  # a synthetic weight well above 0
    embeddings = model(images)
    graph = BatchGraph.build(labels)
    mix = torch.full((3, 2), 0.5)
    losses = model.metric_loss(embeddings, graph, mix, diagnostics=True)
    proxies = model.criterion.proxies
    w = model.generator.synthetic_weight
    (grad,) = torch.autograd.grad(w * losses["J_syn"], [proxies], retain_graph=True)
    assert losses["diag_grad_proxies_J_syn"].item() == pytest.approx(grad.norm().item(), rel=1e-6)
    (grad,) = torch.autograd.grad(losses["J_m"], [embeddings], retain_graph=True)
    assert losses["diag_grad_z_J_m"].item() == pytest.approx(grad.norm().item(), rel=1e-6)
    unit = torch.nn.functional.normalize(embeddings.detach(), dim=-1)
    centres = torch.nn.functional.normalize(proxies.detach(), dim=-1)
    expected = sum(float(unit[i] @ centres[labels[i]]) for i in range(len(labels))) / len(labels)
    assert losses["diag_cos_anchor_proxy"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("to_embeddings", [True, False])
def test_j_gce_reaches_the_embeddings_only_where_asked(to_embeddings):
    trainer = make_trainer()
    model = trainer.model
    model.loss_config.node_loss_to_embeddings = to_embeddings
    images, labels = batch()
    model.train()
    embeddings = model(images).detach().requires_grad_(True)
    graph = trainer.batch_graph(labels)
    losses = model.metric_loss(embeddings, graph, torch.rand(3, 2))
    (grad,) = torch.autograd.grad(losses["J_gce"], embeddings, allow_unused=True, retain_graph=True)
    assert (grad is not None and bool(grad.any())) == to_embeddings
    net_grads = torch.autograd.grad(
        losses["J_gce"], list(model.generator.net.parameters()), allow_unused=True
    )
    # the net learns node classification either way
    assert any(g is not None and bool(g.any()) for g in net_grads)
    (syn_grad,) = torch.autograd.grad(losses["J_syn"], embeddings)
    assert syn_grad.abs().max() > 0  # the synthetic negatives keep their gradient
