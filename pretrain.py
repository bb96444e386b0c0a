"""Pretrain an encoder with CluSiam, CluBYOL, SimSiam or BYOL.

    python pretrain.py --config configs/clusiam.yaml /data/camelyon16_patches
    python pretrain.py --config configs/demo.yaml          # built-in demo data, CPU

See ``python pretrain.py --help`` and clusiam/config.py for every option.
"""
import sys

from clusiam.train import main

if __name__ == "__main__":
    sys.exit(main())
