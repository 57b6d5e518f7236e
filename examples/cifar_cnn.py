"""One-shot pruning of cifar_cnn: load (or train) the model, evaluate dense, sparsify, evaluate, print the table.

    python examples/cifar_cnn.py --methods magnitude sparsegpt --pattern 2:4 --out runs/cifar_cnn.json
"""

from common import run_example

if __name__ == "__main__":
    run_example("cifar_cnn")
