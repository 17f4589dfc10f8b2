"""The project's own CPU decode kernels (`cpu_gemv.cpp`, `cpu_attention.cpp`, `cpu_router.cpp`, sharing
`cpu_kernels.h`), built on first use with the machine's C++ compiler (the one `torch.compile` uses) into one library and
registered as torch operators `torch.ops.llama4_cpu.*`, so eager code and compiled decode steps call
them alike.

- `reduced_gemv(x, w)`: x [M, K] @ w.T for a bfloat16 / float16 w [N, K], float32 accumulation.
  Torch's own bfloat16 matrix-vector loop streams 12-13 GB/s on a 2-core x86 CPU where this one
  (prefetching the rows ahead, four rows per pass) streams about 20 (float32 weights: 25-27).
- `quant_gemv(x, codes, sb, bits, group_size)`: the same for MLX's affine 8-bit / 4-bit weights,
  computed as MLX does (y = sum over groups of scale * sum(q x) + bias * sum(x), in float32): exact
  to the affine form, no re-quantization. Codes are MLX's own (0..255 / 0..15), laid out by `pack`.
  From a few rows on (a prefill's expert products) it dequantizes each block of 4 output rows once
  into float32, as `dequantize` does, and takes every row of x against it from cache: the dequantized
  weight's product, up to float32 summation order, about twice as fast as decoding per pair of rows;
  `quant_mm` runs products of many rows through the float32 GEMM on that weight (`dequantize`),
  dequantized a tile at a time; `expert_gemv(x, codes, sb, ids, bits, group_size)` takes each row of x
  against its own entry of a stack of such weights (a decode step's experts and shared expert) in one call,
  `expert_mm(x, codes, sb, counts, bits, group_size)` runs of rows against the entries (a prefill's rows
  sorted by expert, and the shared expert) in one call.
- `router_topk(x, w, k)`: a few tokens' router logits (x @ w.T, float32 accumulation, rounded to x's
  dtype) and their top-k experts, largest first (ties to the lower id), in one call.
- `decode_attention(q, k, v, scale, mask)`: one query per sequence over its cache, float32 math
  (13.5 us against 65-71 for torch's batched products at 256 keys, 8 heads over 2 kv heads of 64).

Built once per source, torch version and compiler into the user's cache folder (`LLAMA4_KERNEL_CACHE`,
else ~/.cache/llama4-local), written to a temporary name and renamed, so concurrent first uses never
load half a library; a library whose bytes no longer match the digest written beside it is rebuilt.
`LLAMA4_CPU_KERNELS=0` turns them off; where no compiler works the callers use torch's kernels
(`available()` is False, with one warning saying why).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_gemv.cpp", HERE / "cpu_attention.cpp", HERE / "cpu_router.cpp",
           HERE / "cpu_expert_mm.cpp")  # one library
HEADERS = (HERE / "cpu_kernels.h",)
# Products of up to this many rows take the kernels (decoding, and prefill's expert products); more
# rows take the GEMM. Measured on a 2-core x86 CPU: bfloat16 [*, 512] weights at 4 rows 16.8 GB/s
# against 5 for torch's product; quantized [1536, 512] (16 weights in turn, the kernel dequantizing
# each block of 4 output rows once for all rows of x) against `quant_mm`, 4 bits: 16 rows 0.14 ms /
# 0.31, 64 rows 0.63 / 0.65, 128 rows 0.98 / 0.83; 8 bits: 64 rows 0.58 / 0.77, 128 rows 1.20 / 1.08.
MAX_ROWS = 8  # bfloat16 / float16 weights
QUANT_MAX_ROWS = 64  # MLX's affine 8 / 4 bits
LANES = 16  # K must be a multiple of this (bfloat16 / float16 weights)
QUANT_BLOCK = 32  # group sizes must be multiples of this (quantized weights)


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, fastest first: tuned to this CPU with OpenMP threads, then portable ones."""
    native = ["-mcpu=native"] if platform.machine() in ("arm64", "aarch64") else ["-march=native"]
    return [["-O3", *native, "-fopenmp"], ["-O3", *native], ["-O3"]]


def _cache_dir() -> Path:
    root = os.environ.get("LLAMA4_KERNEL_CACHE") or os.path.join(Path.home(), ".cache", "llama4-local")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build(cxx: str, flags: list[str], target: Path) -> None:
    """Compile the source into the shared library `target` (atomically: a temporary name, then a rename)."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    rpath = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    undefined = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, "-shared", "-fPIC", "-std=c++17", abi, *flags, *includes, *map(str, SOURCES), "-o", tmp,
               *libs, *rpath, "-lc10", "-ltorch_cpu", *undefined]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        digest = _digest(Path(tmp))
        fd, tmp_sum = tempfile.mkstemp(suffix=".sha256", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            f.write(digest)
        os.replace(tmp_sum, _digest_file(target))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _intact(target: Path) -> bool:
    """Whether the cached library is the one built (its digest matches): loading a damaged shared library
    can crash the process (a file cut short faults when mapped), so it is checked before loading."""
    try:
        return target.exists() and _digest_file(target).read_text().strip() == _digest(target)
    except OSError:
        return False


_loaded: bool | None = None  # `available()`'s answer, once known (read directly while tracing)


def available() -> bool:
    """Whether the kernels are loaded (building them on the first call of the process; about 10 s once)."""
    global _loaded
    if torch.compiler.is_compiling():
        return bool(_loaded)
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> bool:
    if os.environ.get("LLAMA4_CPU_KERNELS", "1") == "0":
        return False
    if hasattr(torch.ops.llama4_cpu, "reduced_gemv"):  # registered already (another loader)
        return True
    cxx = _compiler()
    if cxx is None:
        warnings.warn("no C++ compiler found: the CPU decode kernels are off (torch's are used)",
                      RuntimeWarning, stacklevel=2)
        return False
    errors = []
    for flags in _flag_sets():
        texts = [f.read_text() for f in (*SOURCES, *HEADERS)]
        key = hashlib.sha256("\0".join([*texts, torch.__version__, cxx, *flags]).encode()).hexdigest()
        target = _cache_dir() / f"cpu_kernels-{key[:16]}.so"
        try:
            if not _intact(target):  # missing, or damaged (a full disk, a copy cut short): built again
                _build(cxx, flags, target)
            torch.ops.load_library(str(target))
            _register_fakes()
            return True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            errors.append(f"{' '.join(flags)}: {detail.strip().splitlines()[-1] if detail.strip() else e}")
    warnings.warn("building the CPU decode kernels failed, torch's are used: " + "; ".join(errors),
                  RuntimeWarning, stacklevel=2)
    return False


def _register_fakes() -> None:
    """Shapes for tracing (`torch.compile`): the results are [M, N] in x's dtype."""

    @torch.library.register_fake("llama4_cpu::reduced_gemv")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("llama4_cpu::quant_gemv")
    def _(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("llama4_cpu::expert_gemv")
    def _(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, ids: torch.Tensor, bits: int,
          group_size: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], codes.shape[1]))

    @torch.library.register_fake("llama4_cpu::expert_mm")
    def _(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, counts: torch.Tensor, bits: int,
          group_size: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], codes.shape[1]))

    @torch.library.register_fake("llama4_cpu::expert_mm_float")
    def _(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[2]))

    @torch.library.register_fake("llama4_cpu::router_topk")
    def _(x: torch.Tensor, w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)

    @torch.library.register_fake("llama4_cpu::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))

    @torch.library.register_fake("llama4_cpu::quant_mm")
    def _(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("llama4_cpu::dequantize")
    def _(codes: torch.Tensor, sb: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
        return codes.new_empty((codes.shape[0], codes.shape[1] * 8 // bits), dtype=torch.float32)


def reduced_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `reduced_gemv` takes x [..., K] and w [N, K] (a few rows, CPU, bfloat16 / float16)."""
    return (x.device.type == "cpu" and w.dim() == 2 and w.dtype == x.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and x.numel() // x.shape[-1] <= MAX_ROWS
            and w.shape[1] % LANES == 0 and w.stride(1) == 1
            and not torch.is_grad_enabled() and available())


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the kernels' [M, K] with unit stride along K (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def reduced_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] through the kernel (see `reduced_fits`)."""
    return torch.ops.llama4_cpu.reduced_gemv(_rows(x), w).view(*x.shape[:-1], -1)  # [M, N] -> [..., N]


def attention_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `decode_attention` takes one query per sequence q [B, 1, H, d] over k [B, KV, S, d] (CPU)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and k.stride(-1) == 1 and not torch.is_grad_enabled() and available())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q [B, 1, H, d] over k, v [B, KV, S, d] (`mask` [B, S], True: may attend) in
    float32 -> [B, 1, H*d] in q's dtype; query head h reads kv head h // (H / KV)."""
    B, _, H, d = q.shape
    out = torch.ops.llama4_cpu.decode_attention(q.reshape(B, H, d), k, v, mask, scale)  # [B, H*d]
    return out.view(B, 1, H * d)


def quant_fits(bits: int, group_size: int, k: int) -> bool:
    """Whether `quant_gemv` takes weights of `bits` in groups of `group_size` over K = `k` inputs."""
    return bits in (4, 8) and group_size % QUANT_BLOCK == 0 and k % group_size == 0


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q [N, K] (integers below 2**bits) in the kernel's layout: uint8 [N, K] for 8 bits; for 4,
    [N, K/2] where byte j of each 16-byte block holds input j of its 32 in the low nibble, j + 16 in the high."""
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    n, k = q.shape
    blocks = q.view(n, k // 32, 2, 16)  # [N, K] -> [N, K/32, (first 16, last 16), 16]
    return (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(n, k // 2)  # [N, K/32, 16] -> [N, K/2]


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack`'s inverse: uint8 codes [N, K] (0..15 for 4 bits)."""
    if bits == 8:
        return codes
    n = codes.shape[0]
    blocks = codes.view(n, -1, 1, 16)  # [N, K/2] -> [N, K/32, 1, 16]
    return torch.cat([blocks & 15, blocks >> 4], dim=2).view(n, -1)  # [N, K/32, 2, 16] -> [N, K]


def dequantize(codes: torch.Tensor, sb: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] of `pack`ed codes and scales|biases [N, K/G, 2] (q * s + b per group)."""
    return torch.ops.llama4_cpu.dequantize(codes, sb, bits, group_size)


def quant_mm(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """`quant_gemv`'s product for many rows (prefill): the float32 GEMM on `dequantize`'s weight, made a
    tile at a time, in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()  # [..., K] -> [M, K]
    y = torch.ops.llama4_cpu.quant_mm(x2, codes, sb, bits, group_size)  # [M, N]
    return y.to(x.dtype).view(*x.shape[:-1], -1)  # [M, N] -> [..., N]


def quant_gemv(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] for the affine weight held as `pack`ed codes and scales|biases [N, K/G, 2]."""
    y = torch.ops.llama4_cpu.quant_gemv(_rows(x), codes, sb, bits, group_size)  # [M, N]
    return y.view(*x.shape[:-1], -1)  # [M, N] -> [..., N]


def expert_gemv(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, ids: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """Row m of x [M, K] against entry ids[m] of a stack of `pack`ed weights (codes [E, N, K * bits / 8],
    scales|biases [E, N, K/G, 2]) -> [M, N] in x's dtype, each row as `quant_gemv` computes it alone."""
    return torch.ops.llama4_cpu.expert_gemv(_rows(x), codes, sb, ids.contiguous(), bits, group_size)


def expert_mm(x: torch.Tensor, codes: torch.Tensor, sb: torch.Tensor, counts: torch.Tensor, bits: int,
              group_size: int) -> torch.Tensor:
    """The rows of x [M, K] in runs against the entries of a stack of `pack`ed weights (codes [E, N, K * bits
    / 8], scales|biases [E, N, K/G, 2]): the first counts[0] rows against entry 0, the next counts[1]
    against entry 1, ... (int64 counts [<= E], adding up to M) -> [M, N] in x's dtype, each run as
    `quant_gemv` computes its rows alone."""
    return torch.ops.llama4_cpu.expert_mm(_rows(x), codes, sb, counts.contiguous(), bits, group_size)


def expert_float_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `expert_mm_float` takes rows of x [M, K] against the stack w [E, K, N] (float32 on the CPU,
    the stack contiguous: the input-major storage of float32 CPU experts)."""
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and w.dim() == 3 and w.is_contiguous()
            and x.shape[-1] == w.shape[1] and not torch.is_grad_enabled() and available())


def expert_mm_float(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The rows of x [M, K] in runs against the entries of the float32 stack w [E, K, N] (see
    `expert_float_fits`): the first counts[0] rows against w[0], the next counts[1] against w[1], ... (int64
    counts [<= E], adding up to M) -> [M, N]; each row's numbers independent of the other rows."""
    return torch.ops.llama4_cpu.expert_mm_float(x, w, counts.contiguous())


# Tokens up to this many take `router_topk` (decoding); more take the GEMM and torch's top-k.
ROUTER_MAX_ROWS = 16


def router_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `router_topk` takes x [T, D] and the router weight w [E, D] (a few tokens, CPU, float)."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= ROUTER_MAX_ROWS
            and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not torch.is_grad_enabled() and available())


def router_topk(x: torch.Tensor, w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k router logits [T, k] (largest first) and their expert ids [T, k] of x [T, D] against w [E, D]."""
    return torch.ops.llama4_cpu.router_topk(x, w, k)
