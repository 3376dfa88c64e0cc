"""The real recipe: exact CIFAR-10 statistics, fitted once and cached.

This example downloads CIFAR-10 (170 MB) into ./data the first time a user runs it;
nothing in the test suite runs it.

    python examples/cifar10.py
"""

from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10

from torchnormfit import FitNormalize


def main() -> None:
    norm = FitNormalize()
    train = CIFAR10("data", train=True, download=True, transform=transforms.Compose([transforms.ToTensor(), norm]))
    norm.fit(train)  # one exact pass the first time; a cache hit in milliseconds afterwards
    print(norm)  # about mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616]

    # The same statistics for the test split (never fit on test data):
    test = CIFAR10("data", train=False, download=True, transform=transforms.Compose([transforms.ToTensor(), norm]))
    loader = DataLoader(train, batch_size=256, shuffle=True, num_workers=2)
    images, labels = next(iter(loader))
    print(f"a normalized training batch: mean {images.mean():.3f}, std {images.std():.3f}; test set: {len(test)}")


if __name__ == "__main__":
    main()
