"""clusiam: CluSiam / CluBYOL self-supervised pretraining for histopathology patches."""

__version__ = "0.1.0"
