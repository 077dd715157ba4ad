"""retention_jax: early exposure, post-training and fine-tuning retention experiments in JAX."""

import setuptools

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "ml_collections>=1.0",
    "absl-py",
    "etils[epath,epath-gcs]",  # run directories on local disk or gs:// (gcsfs)
    "numpy",
    "scipy",
    "matplotlib",
    "tokenizers>=0.20",
    "safetensors>=0.4",  # HF checkpoints in and out (retention_jax.hf, export)
    "huggingface_hub",
    "pyarrow",
    "pyyaml",
    "tensorboard>=2.16",  # its event protos and record format (retention_jax.tensorboard)
    "clu>=0.0.12",  # the parameter overview (clu.parameter_overview; not its TF writers)
]

EXTRAS = {
    "tf": ["tensorflow-cpu>=2.16,<3"],
    "tfds": [
        "tensorflow-cpu>=2.16,<3",
        "tensorflow-datasets>=4.9",
        "array-record>=0.5",
        "importlib_resources",  # imported by tensorflow-datasets, not declared by it
    ],
    "seqio": ["tensorflow-cpu>=2.16,<3", "seqio>=0.0.19"],
    "hf": [
        "torch>=2.4,<3",
        "transformers>=4.45",
        "datasets>=2.19",
        "sentencepiece",
    ],
    "xm": ["xmanager"],
    "cuda": ["jax[cuda12]"],
    "tpu": ["jax[tpu]>=0.10"],  # libtpu: TPU runs, and deviceless TPU compiles on any host
    "dev": [
        "pytest",
        "pytest-xdist",
        "chex",
        "nbclient",
        "nbformat",
        "ipykernel",
        "ruff",
    ],
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
