"""A user's own data and model: plain torch, no octopusd plugin."""
import torch
from torch import nn
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Four Gaussian blobs in 2-D; each silo draws its own samples (seed)."""

    centers = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = self.centers[self.y] + torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(seed: int) -> TinyNet:
    torch.manual_seed(seed)  # every party builds the same initial model
    return TinyNet()
