"""A stand-in backbone and a fixed class-balanced batch for the model, trainer and k-NN tests."""

import torch


class TinyBackbone(torch.nn.Module):
    """Stands in for a CNN: a linear map of fixed random 'images' (feature vectors)."""

    out_features = 24

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(20, self.out_features)

    def forward(self, x):
        return torch.relu(self.lin(x))


def batch(num_classes=4, per_class=3):
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randn(labels.numel(), 20, generator=generator) + labels.unsqueeze(1) * 0.3
    return images, labels
