"""Top-1 cosine nearest-neighbour search: clusiam's backends against scikit-learn brute force.

    python benchmarks/knn.py                       # 100k bank x 100k queries x 512-d
    python benchmarks/knn.py --n_train 20000 --n_test 20000 --skip_sklearn

Features are seeded Gaussian vectors, L2-normalised (search time does not depend on what
the vectors mean). Prints seconds per backend, the speed-up over scikit-learn's
KNeighborsClassifier(n_neighbors=1, metric='cosine', algorithm='brute', n_jobs=-1), and the
share of queries whose neighbour agrees with scikit-learn's.
"""
import argparse
import os
import platform
import time

import numpy as np
import torch

from clusiam.knn import BACKENDS, faiss_gpu_usable, l2_normalize, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_train", type=int, default=100_000)
    parser.add_argument("--n_test", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--skip_sklearn", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    bank = l2_normalize(rng.standard_normal((args.n_train, args.dim), dtype=np.float32))
    queries = l2_normalize(rng.standard_normal((args.n_test, args.dim), dtype=np.float32))
    print(f"{args.n_train} x {args.n_test} x {args.dim}, {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}"
          f"{', GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")

    available = [b for b in BACKENDS
                 if (b != "faiss-gpu" or faiss_gpu_usable()) and (b != "torch-cuda" or torch.cuda.is_available())]
    timings, neighbours = {}, {}
    for backend in available:
        search(bank[:1000], queries[:10], 1, backend)  # warm-up (CUDA context, BLAS threads)
        started = time.perf_counter()
        _, index = search(bank, queries, 1, backend)
        timings[backend] = time.perf_counter() - started
        neighbours[backend] = index[:, 0]
    if not args.skip_sklearn:
        from sklearn.neighbors import KNeighborsClassifier

        started = time.perf_counter()
        knn = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute", n_jobs=-1)
        knn.fit(bank, np.zeros(len(bank)))
        index = knn.kneighbors(queries, 1, return_distance=False)
        timings["sklearn"] = time.perf_counter() - started
        neighbours["sklearn"] = index[:, 0]

    print(f"{'backend':<12}{'seconds':>10}{'vs sklearn':>12}{'agree':>10}")
    for backend, seconds in timings.items():
        ratio = f"{timings['sklearn'] / seconds:.1f}x" if "sklearn" in timings else "-"
        agree = f"{(neighbours[backend] == neighbours['sklearn']).mean():.4f}" if "sklearn" in neighbours else "-"
        print(f"{backend:<12}{seconds:>10.2f}{ratio:>12}{agree:>10}")


if __name__ == "__main__":
    main()
