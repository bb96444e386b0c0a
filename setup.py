from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="clusiam",
    version="0.1.0",
    description="CluSiam / CluBYOL self-supervised pretraining for histopathology patches",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["clusiam", "clusiam.*", "mil", "mil.*"]),
    package_data={"clusiam": ["assets/*"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "lightly>=1.5",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "scikit-learn",
        "matplotlib",
        "tiffslide",
        "faiss-cpu",
        "h5py",
        "scikit-image>=0.26",
        "shapely>=2",
        "timm",
        "safetensors",
        "umap-learn",  # the embedding maps of the KNN report
    ],
    # transformers' SegformerModel is the independent reference the MiT-B1 tests compare against;
    # ruff lints the code (ruff.toml) before the tests run.
    extras_require={"test": ["pytest", "transformers", "ruff~=0.17.0"]},
)
