"""t5x_like: one JAX/Flax trainer for pretraining, tuning and scaling-law sweeps."""

from setuptools import find_packages, setup

# Exact pins: this set was installed together and `pip check`-ed on Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    # jax asks for ml_dtypes>=0.5. 0.7.0 registers its numpy loops through an API whose every call
    # scans those already registered: every process's `import jax` took 2.51 s with it, 1.40 s with
    # 0.6.0, which has every dtype jax 0.10 names (docs/performance.md, item 57).
    "ml_dtypes==0.6.0",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "grain==0.2.18",
    "numpy>=2.0,<3",
    "scipy==1.17.1",
    "tqdm>=4.66,<5",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "filelock==4.3.2",  # jax's compilation cache evicts under it; the command caps the cache (t5x_like/__main__.py)
]

EXTRAS_REQUIRE = {
    # torch and transformers build the reference models for the Hugging Face
    # parity tests; they are never imported by the library itself at import time.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "torch==2.13.0",
        "transformers==5.24.0",
        "portpicker>=1.6,<2",
        "ray==2.60.0",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ],
}

setup(
    name="t5x_like",
    version="0.1.0",
    description="A readable JAX/Flax NNX codebase for training language models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["t5x_like", "t5x_like.*", "models", "models.*"]),
    # The bundled corpora and tokenizer, so the main job needs no download.
    package_data={"t5x_like.data": ["corpora/README.md", "corpora/*/*.txt", "corpora/*/*.jsonl",
                                    "tokenizers/*.model"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["t5x-like=t5x_like.__main__:main"]},
)
