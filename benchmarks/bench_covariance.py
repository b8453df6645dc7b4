"""Streaming covariance and spectral penalty benchmark, standalone:

    python benchmarks/bench_covariance.py --threads 2 --n 1024 --d 256 --k 10

The cases live in selkernels/bench_covariance.py, so ``selkernels bench`` runs them too.
"""
from selkernels.bench_covariance import main

if __name__ == "__main__":
    main()
