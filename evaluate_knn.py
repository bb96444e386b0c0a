"""Top-1 KNN patch classification (the paper's F1) for one or many checkpoints, as a report.

    python evaluate_knn.py --checkpoint runs/clusiam/last.pth --train TRAIN --test TEST --out reports/knn

See ``python evaluate_knn.py --help`` and clusiam/knn_eval.py.
"""
import sys

from clusiam.knn_eval import main

if __name__ == "__main__":
    sys.exit(main())
