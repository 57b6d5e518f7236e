"""One-shot pruning of vgg16_cifar: load (or train) the model, evaluate dense, sparsify, evaluate, print the table.

    python examples/vgg16_cifar.py --methods magnitude sparsegpt --pattern 2:4 --out runs/vgg16_cifar.json
"""

from common import run_example

if __name__ == "__main__":
    run_example("vgg16_cifar")
