"""Install with `pip install --no-build-isolation -e .` so the C++ extension builds against the
torch already installed (build isolation would download another torch)."""
import glob

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    ext_modules = [CppExtension("cma_kernels._C", sources, depends=sorted(glob.glob("csrc/*.h")),
                                extra_compile_args={"cxx": ["-O3", "-fopenmp"]}, extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="cma",
    version="0.1.0",
    description="Fast parameter-efficient text-video retrieval: the Cross-Modal Adapter on open_clip, "
                "with fused kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cma_kernels", "cma_model", "cma_train", "cma_benchmarks"],
    package_dir={"cma_benchmarks": "benchmarks"},
    # decord has wheels for x86-64 only: elsewhere (ARM: Grace Hopper) cma installs without it and
    # trains from a frame cache; reading videos then says how to get decord
    install_requires=["torch>=2.6", "torchvision", "triton", "open_clip_torch>=2.24", "av", "numpy", "tqdm",
                      "matplotlib", "pyyaml", "decord; platform_machine == 'x86_64' or platform_machine == 'AMD64'"],
    extras_require={"test": ["pytest", "pytest-xdist"]},   # -n 2: the suite on both cores
    entry_points={"console_scripts": ["cma=cma_train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
