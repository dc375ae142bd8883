"""megatron-flash: pretraining of Nemotron-Flash hybrid small language models on Megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-flash",
    version="0.1.0",
    description="Megatron-core pretraining for Nemotron-Flash hybrid (DeltaNet / Mamba2 / attention) language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_flash", "megatron_flash.*"]),
    # torch is deliberately unpinned: never reinstall over a cluster's CUDA build. For a CPU-only machine,
    # install `torch==2.13.0` first (see README).
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # megatron's dist_checkpointing needs it but does not declare it: saves hang silently without it
        "einops",
        "numpy",
        "safetensors",
        "sentencepiece",
        "tensorboard",
        "tokenizers",
        "transformers>=4.56",
        "tqdm",
        "pyyaml",
        "zstandard",
        "pyarrow",
    ],
    extras_require={
        "gpu": ["flash-linear-attention==0.6.0", "fla-core==0.6.0", "mamba-ssm", "causal-conv1d"],
        "te": ["transformer-engine[pytorch]"],
        # triton lets fla and megatron's SSM modules import on CPU (their kernels are not launched there)
        "dev": ["pytest", "pytest-timeout", "triton", "flash-linear-attention==0.6.0", "fla-core==0.6.0",
                "matplotlib", "scipy"],
        # architecture search, depth-width fit, plots (tools/search_arch.py, tools/depth_width_study.py)
        "design": ["scipy", "matplotlib"],
    },
)
