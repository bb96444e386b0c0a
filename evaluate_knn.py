"""Top-1 KNN patch classification (the paper's F1) for one or many checkpoints, as a report.

    python evaluate_knn.py --checkpoint runs/clusiam/last.pth --train TRAIN --test TEST --out reports/knn
    python evaluate_knn.py --checkpoint runs/clusiam/last.pth --train JOB/train.csv --test JOB/test.csv --out knn/

The second reads tables of slide, x, y, label from the tiling job's slides. See
``python evaluate_knn.py --help`` and clusiam/knn_eval.py.
"""
import sys

from clusiam.knn_eval import main

if __name__ == "__main__":
    sys.exit(main())
