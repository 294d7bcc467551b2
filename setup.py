"""All metadata lives in pyproject.toml. This file only ships csrc/plora_unload.cu inside the package
(as plora_kernels/_csrc/) so that a non-editable install can still build the CUDA twin on first use."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc" / "plora_unload.cu"


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "plora_kernels" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(CSRC, target / CSRC.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
