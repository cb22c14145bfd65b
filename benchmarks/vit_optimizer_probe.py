"""Does the zoo's vit-tiny learn the embedded digits with SGD (the only optimizer SplitConfig
carries) or only with Adam? Centralized training, 3 epochs, batch 32; test accuracy per setting.

    python benchmarks/vit_optimizer_probe.py
"""

from __future__ import annotations

import torch

import flsplit.data.datasets as datasets
from flsplit.model.zoo import digits_cnn, vit_tiny


def accuracy(model_fn, optimizer_fn, epochs: int = 3) -> float:
    train, test = datasets._digits()
    torch.manual_seed(0)
    model = model_fn()
    opt = optimizer_fn(model.parameters())
    for _ in range(epochs):
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(test.x).argmax(1) == test.y).float().mean())


if __name__ == "__main__":
    for name, fn in (("vit-tiny", vit_tiny), ("digits-cnn", digits_cnn)):
        for label, opt in (("sgd lr 0.1 m 0.9", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
                           ("sgd lr 0.01 m 0.9", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
                           ("sgd lr 1.0", lambda p: torch.optim.SGD(p, lr=1.0)),
                           ("adam lr 1e-3", lambda p: torch.optim.Adam(p, lr=1e-3))):
            print(f"{name:11s} {label:18s} test accuracy {accuracy(fn, opt):.3f}", flush=True)
