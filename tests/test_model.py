import copy

import pytest
import torch

from gca_pyg.errors import NonFiniteLossError
from gca_pyg.model import GCAHNG, LossConfig, NetConfig, OptimConfig


class TinyBackbone(torch.nn.Module):
    """Stands in for a CNN: a linear map of fixed random 'images' (feature vectors)."""
    out_features = 24

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(20, self.out_features)

    def forward(self, x):
        return torch.relu(self.lin(x))


def make_model(warmup_epochs=0, synthesis=True, **optim):
    torch.manual_seed(0)
    return GCAHNG(TinyBackbone(), num_classes=6, embedding_size=16,
                  net=NetConfig(num_layers=2, heads=4, dropout=0.1),
                  loss=LossConfig(synthesis=synthesis),
                  optim=OptimConfig(warmup_epochs=warmup_epochs, epochs=10, **optim))


def batch(num_classes=4, per_class=3):
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randn(labels.numel(), 20, generator=generator) + labels.unsqueeze(1) * 0.3
    return images, labels


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(module, before):
    return {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}


def parts(model):
    return {"backbone": model.backbone, "embedding": model.embedding, "net": model.net,
            "classifier": model.classifier}


def changed_parts(model, before):
    return {part for part, module in parts(model).items() if changed(module, before[part])}


def test_each_update_changes_exactly_the_parameters_it_owns():
    model = make_model()
    images, labels = batch()
    model.train()
    embeddings = model(images)

    before = {part: snapshot(module) for part, module in parts(model).items()}
    model.generator_update(embeddings.detach(), labels)
    assert changed_parts(model, before) == {"net"}

    before = {part: snapshot(module) for part, module in parts(model).items()}
    model.classifier_update(embeddings.detach(), labels)
    assert changed_parts(model, before) == {"classifier"}
    assert model.classifier.weight.grad is not None and model.net.lin_in.weight.grad is not None

    before = {part: snapshot(module) for part, module in parts(model).items()}
    model.metric_update(embeddings, labels)
    assert changed_parts(model, before) == {"backbone", "embedding", "net"}


def test_generator_update_leaves_no_gradient_on_the_classifier():
    model = make_model()
    images, labels = batch()
    model.generator_update(model(images).detach(), labels)
    assert model.classifier.weight.grad is None


def test_training_lowers_the_metric_loss_and_stays_finite():
    model = make_model()
    images, labels = batch()
    first = model.training_step(images, labels)
    expected_keys = {"J_m", "J_gce", "J_syn", "J_metric", "J_cls", "J_gen", "J_ce", "J_sim", "J_div"}
    assert set(first) == expected_keys
    logs = [first] + [model.training_step(images, labels) for _ in range(29)]
    assert all(torch.isfinite(torch.tensor(list(log.values()))).all() for log in logs)
    assert logs[-1]["J_m"] < 0.7 * first["J_m"]


def test_warmup_freezes_the_backbone_only():
    model = make_model(warmup_epochs=1)
    images, labels = batch()
    before = {part: snapshot(module) for part, module in parts(model).items()}
    model.training_step(images, labels)
    assert changed_parts(model, before) == {"embedding", "net", "classifier"}
    model.end_epoch()
    before = {part: snapshot(module) for part, module in parts(model).items()}
    model.training_step(images, labels)
    assert "backbone" in changed_parts(model, before)


def test_synthesis_off_is_the_same_model_without_generator():
    model = make_model(synthesis=False)
    images, labels = batch()
    before = {part: snapshot(module) for part, module in parts(model).items()}
    logs = model.training_step(images, labels)
    assert set(logs) == {"J_m", "J_gce", "J_metric", "J_cls"}
    assert logs["J_metric"] == pytest.approx(logs["J_m"] + logs["J_gce"], rel=1e-6)
    assert changed_parts(model, before) == {"backbone", "embedding", "net", "classifier"}


def test_end_epoch_rolls_running_means_and_schedules():
    model = make_model(metric_lr_step=1, metric_lr_gamma=0.5)
    images, labels = batch()
    assert model.synthetic_weight == pytest.approx(0.0, abs=1e-4)
    assert model.hardness == pytest.approx(1.0, abs=1e-5)
    logs = [model.training_step(images, labels) for _ in range(3)]
    model.end_epoch()
    assert model.epoch == 1
    assert model.mean_metric_loss == pytest.approx(sum(log["J_m"] for log in logs) / 3)
    assert model.mean_generator_loss == pytest.approx(sum(log["J_gen"] for log in logs) / 3)
    assert model.metric_optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4 / 2)
    assert model.net_optimizer.param_groups[0]["lr"] < 1.5e-4
    assert 0 < model.synthetic_weight < 1 and 0 < model.hardness < 1


def test_non_finite_loss_stops_before_any_update():
    model = make_model()
    images, labels = batch()
    images[0, 0] = float("nan")
    before = {part: snapshot(module) for part, module in parts(model).items()}
    with pytest.raises(NonFiniteLossError, match="J_metric became nan at epoch 1, iteration 1"):
        model.training_step(images, labels)
    assert changed_parts(model, before) == set()


def test_unbalanced_batch_fails_clearly():
    model = make_model()
    images, _ = batch()
    with pytest.raises(ValueError, match="class-balanced"):
        model.training_step(images, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]))


def test_training_state_round_trip_continues_identically():
    model = make_model()
    images, labels = batch()
    for _ in range(2):
        model.training_step(images, labels)
    model.end_epoch()
    model.training_step(images, labels)

    resumed = make_model()
    resumed.load_state_dict(copy.deepcopy(model.state_dict()))
    resumed.load_training_state_dict(copy.deepcopy(model.training_state_dict()))
    torch.manual_seed(5)
    expected = model.training_step(images, labels)
    torch.manual_seed(5)
    actual = resumed.training_step(images, labels)
    assert actual == expected
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_moves_to_a_device_and_trains_there(device):
    model = make_model().to(device)
    images, labels = batch()
    logs = model.training_step(images, labels)  # inputs are moved to the model's device
    assert model.device.type == device.type
    assert all(torch.isfinite(torch.tensor(list(logs.values()))))


def test_embed_is_deterministic_and_keeps_the_mode():
    model = make_model()
    images, _ = batch()
    model.train()
    first = model.embed(images)
    assert model.training and not first.requires_grad
    assert torch.equal(first, model.embed(images))
    assert first.shape == (12, 16)


def test_seeded_training_repeats_bit_for_bit():
    def train_a_little():
        torch.manual_seed(3)
        model = GCAHNG(TinyBackbone(), num_classes=27, embedding_size=64,
                       optim=OptimConfig(warmup_epochs=0))
        images = torch.randn(81, 20)
        labels = torch.arange(27).repeat_interleave(3)
        for _ in range(2):
            model.training_step(images, labels)
        return model.state_dict()

    first, second = train_a_little(), train_a_little()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name
