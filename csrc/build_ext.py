"""Build of the extension `tkd_core._C` for setup.py: `extension_kwargs()` -> setup() kwargs.

pybind11 only (no torch C++ headers, no torch.utils.cpp_extension), so pip's isolated build env
needs setuptools + pybind11, not torch. The CPU part (AVX2 chosen at run time, scalar fallback,
OpenMP) is always built. The CUDA part (int8_gemm_cuda.cu, tensor cores, sm_80+) is compiled by
nvcc and linked in only when nvcc exists AND the installed torch is a CUDA build (read from
torch/version.py without importing torch: it is not importable inside the isolated build env);
otherwise a one-line notice says the build is CPU-only. Env knobs:
  TKD_CUDA_ARCHS   architectures, default "80;86;89;90a"
  TKD_WITH_CUDA    "1" forces the CUDA part, "0" skips it (default: auto-detect)
"""
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["bindings.cpp", "cpu_pool.cpp", "int8_gemm_cpu.cpp", "int8_gemm_avx512.cpp",
               "encoder_cpu.cpp", "out_pool.cpp"]
CUDA_SOURCE = "int8_gemm_cuda.cu"
DEFAULT_ARCHS = "80;86;89;90a"


def cuda_archs():
    """TKD_CUDA_ARCHS ("80;86;89;90a" or with commas/spaces) -> ["80", "86", "89", "90a"]."""
    raw = os.environ.get("TKD_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in re.split(r"[;, ]+", raw)]
    archs = [a for a in archs if a]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}a?", a)]
    if bad or not archs:
        raise ValueError(f"TKD_CUDA_ARCHS={raw!r}: expected e.g. '80;86;89;90a'")
    return archs


def gencode_flags(archs):
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_lib_dirs(nvcc):
    """Directories holding libcudart_static.a (nvcc may be a wrapper script outside CUDA_HOME)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    try:  # where nvcc itself says its libraries are
        out = subprocess.run([nvcc, "-dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
        homes += re.findall(r"_TOP_=(\S+)", out)
    except OSError:
        pass
    found = []
    for home in filter(None, homes):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib")):
            d = os.path.join(home, sub)
            if os.path.exists(os.path.join(d, "libcudart_static.a")) and d not in found:
                found.append(d)
    return found


def installed_torch_cuda():
    """CUDA version string of the installed torch (None for a CPU build or no torch)."""
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:
        pass
    dirs.update(p for p in sys.path if p)
    for d in dirs:
        path = os.path.join(d, "torch", "version.py")
        if os.path.exists(path):
            m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", open(path).read(), re.M)
            return m.group(1) if m else None
    return None


def want_cuda():
    forced = os.environ.get("TKD_WITH_CUDA")
    nvcc = find_nvcc()
    if forced == "0":
        return None, "TKD_WITH_CUDA=0"
    if not nvcc:
        return None, "nvcc not found"
    if forced != "1" and not installed_torch_cuda():
        return None, "torch is a CPU build"
    return nvcc, ""


def extension_kwargs():
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    nvcc, why_not = want_cuda()
    cxx_flags = ["-O3", "-std=c++17", "-pthread", "-fno-math-errno"]
    ext = Pybind11Extension(
        "tkd_core._C",
        sources=[os.path.relpath(os.path.join(HERE, s)) for s in CPU_SOURCES],
        include_dirs=[HERE],
        extra_compile_args=cxx_flags,
        extra_link_args=["-pthread"],
        cxx_std=17,
    )
    if nvcc:
        ext.define_macros = [("TKD_WITH_CUDA", "1")]
        ext.library_dirs = cuda_lib_dirs(nvcc)
        ext.libraries = ["cudart_static", "dl", "rt", "pthread"]
    else:
        print(f"tkd: building tkd_core._C for CPU only ({why_not}); CUDA INT8 GEMM not built",
              file=sys.stderr)

    class BuildExt(build_ext):
        """Compiles the .cu with nvcc into an object linked into _C (CUDA builds only)."""

        def build_extensions(self):
            if nvcc:
                archs = cuda_archs()
                obj_dir = os.path.join(self.build_temp, "cuda")
                os.makedirs(obj_dir, exist_ok=True)
                obj = os.path.join(obj_dir, "int8_gemm_cuda.o")
                cmd = [nvcc, "-c", os.path.join(HERE, CUDA_SOURCE), "-o", obj, "-O3",
                       "-std=c++17", "-Xcompiler", "-fPIC", *gencode_flags(archs)]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                for e in self.extensions:
                    e.extra_objects = list(e.extra_objects or []) + [obj]
            super().build_extensions()

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt}}
