"""tfx-vlm: a TokenFLEX vision-language trainer. Import name `tfx`; kernels as `tfx_kernels`."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tfx-vlm",
    version="0.1.0",
    description="TokenFLEX VLM training with flexible visual-token counts on DeepSpeed ZeRO-3",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tfx", "tfx.*"])
    + find_packages("kernels", include=["tfx_kernels", "tfx_kernels.*"]),
    package_dir={"tfx_kernels": "kernels/tfx_kernels"},
    install_requires=[
        "torch>=2.4", "deepspeed>=0.16", "transformers>=5.0", "accelerate>=1.1",
        "webdataset>=1.0", "sentencepiece", "safetensors", "pillow", "numpy", "tqdm",
        "PyYAML", "tensorboard", "matplotlib", "triton; platform_system == 'Linux'",
    ],
    extras_require={"flash": ["flash-attn>=2.6"], "test": ["pytest"]},
    entry_points={"console_scripts": ["tfx = tfx.cli:main"],
                  # lmms-eval's model registry: `lmms-eval --model tokenflex` (tfx.export.lmms)
                  "lmms_eval.models": ["tokenflex = tfx.export.lmms:manifest"]},
)
