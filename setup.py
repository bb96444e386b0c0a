from pathlib import Path

from setuptools import find_packages, setup

DOCS = ["mkdocs-material", "mkdocstrings[python]"]

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
        "timm>=1.0.31",  # save_for_hf(data_config=...) and local-dir: folders (clusiam.export --format hub)
        "safetensors",
        "umap-learn",  # the embedding maps of the KNN report
        "fsspec",  # slides and coordinate files read from URLs (clusiam/storage.py)
        "universal_pathlib",
    ],
    # cloud: fsspec's filesystems for s3:// and gs:// slides. docs: the documentation site (mkdocs.yml;
    # `mkdocs serve`). test: transformers' SegformerModel is the independent reference the MiT-B1 tests
    # compare against, and loads the MiT-B1 hub export; kaiko-eva loads the timm hub exports as eva's
    # configs do; s3fs with moto's S3 server, started by the tests on 127.0.0.1, reads slides from S3;
    # ruff lints the code (ruff.toml) before the tests run; the docs extra builds the site under --strict.
    extras_require={"cloud": ["s3fs", "gcsfs"],
                    "docs": DOCS,
                    "test": ["pytest", "transformers", "kaiko-eva[vision]", "ruff~=0.17.0", "s3fs", "moto[server]",
                             *DOCS]},
)
