"""retention_jax: early exposure, post-training and fine-tuning retention experiments in JAX."""

import setuptools

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "absl-py",
    "numpy",
    "matplotlib",
    "tokenizers>=0.20",
    "pyarrow",
]

EXTRAS = {
    "tf": ["tensorflow-cpu", "tensorboard"],
    "tfds": ["tensorflow-datasets", "array-record"],
    "seqio": ["seqio"],
    "hf": ["torch==2.13.0", "transformers>=4.45", "safetensors", "datasets", "sentencepiece"],
    "xm": ["xmanager"],
    "cuda": ["jax[cuda12]"],
    "dev": ["pytest", "pytest-xdist", "chex", "nbclient", "nbformat", "ipykernel", "ruff"],
}

setuptools.setup(
    name="retention_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["retention_jax", "retention_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
