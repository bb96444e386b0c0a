"""Pretrain an encoder with CluSiam, CluBYOL, SimSiam or BYOL.

    python pretrain.py --config configs/clusiam.yaml /data/camelyon16/patches
    python pretrain.py --config configs/demo.yaml          # built-in demo data, CPU
    python pretrain.py --config configs/clusiam.yaml JOB   # patches read from a tiling job's slides
    python pretrain.py --config configs/clusiam.yaml --coords TRIDENT_OR_CLAM_COORDS --slides SLIDES_DIR

    torchrun --nproc_per_node 8 pretrain.py --config configs/clubyol.yaml DATA   # 8 GPUs

See ``python pretrain.py --help`` and clusiam/config.py for every option.
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from clusiam.train import main

if __name__ == "__main__":
    # record: under torchrun, an unexpected exception's traceback reaches torchrun's failure summary.
    sys.exit(record(main)())
