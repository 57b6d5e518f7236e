"""One-shot pruning of mnist_cnn: load (or train) the model, evaluate dense, sparsify, evaluate, print the table.

    python examples/mnist_cnn.py --methods magnitude sparsegpt --pattern 2:4 --out runs/mnist_cnn.json
"""

from common import run_example

if __name__ == "__main__":
    run_example("mnist_cnn")
