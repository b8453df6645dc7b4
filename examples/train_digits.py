"""Class-selectivity regularization on scikit-learn digits: the same run as ``selkernels demo``.

    python examples/train_digits.py                 # alphas -10 -1 0 1 10, 3 seeds, a few minutes on 2 cores
    python examples/train_digits.py --quick         # seconds
    python examples/train_digits.py --out results   # also CSV, JSON and a plot

See selkernels/demo.py for the model, the training loop and how the test-set SI is measured.
"""
from selkernels.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
