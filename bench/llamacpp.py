"""llama.cpp's own programs (llama-server, llama-bench) built from the llama.cpp source inside the llama-cpp-python
sdist (cmake, g++), once per instruction-set variant, under .venv/llama-cpp; what the benches run beside tridlm.

    native: -DGGML_NATIVE=ON, everything this CPU has (AVX-512 where present)
    avx2:   -DGGML_NATIVE=OFF with AVX2/FMA/F16C/BMI2 and AVX-512/AVX-VNNI off: what most laptops and desktops run
    avxvnni: the same with AVX-VNNI on (the 256-bit integer dot products of recent CPUs without AVX-512)
"""

import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # whose sdist carries the llama.cpp source we build
ROOT = Path(".venv/llama-cpp")
COMMON = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
VARIANTS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": [
        "-DGGML_NATIVE=OFF",
        *(f"-DGGML_{f}=ON" for f in ("AVX", "AVX2", "FMA", "F16C", "BMI2")),
        *(f"-DGGML_{f}=OFF" for f in ("AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI")),
    ],
    "avxvnni": [
        "-DGGML_NATIVE=OFF",
        *(f"-DGGML_{f}=ON" for f in ("AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI")),
        *(f"-DGGML_{f}=OFF" for f in ("AVX512", "AVX512_VNNI", "AVX512_BF16")),
    ],
}


def source() -> Path:
    """The llama.cpp source tree (downloaded and unpacked on first use)."""
    found = next(ROOT.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if found is None:
        ROOT.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(ROOT)]
        subprocess.run([*pip, LLAMA_CPP_PYTHON], check=True, capture_output=True)
        with tarfile.open(next(ROOT.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(ROOT, filter="data")
        found = next(ROOT.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return found


def build(target: str, variant: str = "native") -> Path | None:
    """llama.cpp's ``target`` (llama-server, llama-bench) built for ``variant`` (cached), or None (said why)."""
    try:
        src = source()
        directory = src / ("build" if variant == "native" else f"build-{variant}")
        binary = directory / "bin" / target
        if not binary.exists():
            for step in (
                ["cmake", "-S", src, "-B", directory, *COMMON, *VARIANTS[variant]],
                ["cmake", "--build", directory, "--target", target, "-j2"],
            ):
                subprocess.run(step, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as e:
        print(f"llama.cpp's {target} ({variant}) could not be built ({e}): reported as missing", file=sys.stderr)
        return None
    return binary if binary.exists() else None
