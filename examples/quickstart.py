"""Quick start, offline in seconds: train a small CNN on scikit-learn's digits, prune it 2:4 and 1:4, compare methods.

    python examples/quickstart.py                      # same as `sgfx demo`
    python examples/quickstart.py --patterns 0.5 0.7
"""

import sys

from sgfx.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
