"""Builds the CPU kernels (src/tridlm/kernels/cpu.cpp) into the package as it is installed: a module per
instruction-set variant this compiler builds (``tridlm.kernels.VARIANTS``), so that no forward waits for a compiler.
torch must be installed first and the build must see it (``pip install --no-build-isolation``, as ``make setup``
does); where torch or a compiler is missing, or a variant does not compile, the package installs without those modules
and says so in one line, and ``tridlm.kernels`` builds the kernels on first use instead (or runs torch's ops)."""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup

KERNELS = Path("src/tridlm/kernels")


def variant_source(variant: str) -> str:
    """A source of one line including cpu.cpp, one per variant, so that each build writes an object file of its own
    (with one source for all, each would overwrite the last one's)."""
    path = Path("build/tridlm-kernels") / f"{variant}.cpp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#include "{(KERNELS / "cpu.cpp").resolve()}"\n')
    return str(path)


def kernel_build():
    """The extensions and the build command that compiles them, or nothing where torch is not importable."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("tridlm: torch is not importable here: the CPU kernels will be built on first use", file=sys.stderr)
        return {}
    spec = importlib.util.spec_from_file_location("tridlm_kernels_at_build", KERNELS / "__init__.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)

    class BuildKernels(cpp_extension.BuildExtension):
        """Every variant in turn (two at a time raced in the link step); one that does not compile is left out of the
        package with one line."""

        def build_extensions(self):
            self.parallel = None
            super().build_extensions()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # a compiler without this instruction set, or none at all
                print(f"tridlm: {ext.name} not built ({type(e).__name__}); built on first use instead", file=sys.stderr)

    digest = kernels.source_digest()
    extensions = [
        cpp_extension.CppExtension(
            f"tridlm.kernels._cpu_{variant}",
            [variant_source(variant)],
            extra_compile_args=[*kernels.compiler_flags(variant), "-g0", f"-DTRIDLM_DIGEST={digest}"],
            extra_link_args=["-fopenmp"],
            optional=True,  # installed without it where it failed
        )
        for variant in kernels.VARIANTS
    ]
    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildKernels}}


setup(**kernel_build())
