"""One-shot pruning of resnet18_cifar: load (or train) the model, evaluate dense, sparsify, evaluate, print the table.

    python examples/resnet18_cifar.py --methods magnitude sparsegpt --pattern 2:4 --out runs/resnet18_cifar.json
"""

from common import run_example

if __name__ == "__main__":
    run_example("resnet18_cifar")
