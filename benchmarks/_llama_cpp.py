"""llama.cpp as a benchmark peer: the same weights as GGUF files, timed through `llama-cpp-python`.

A benchmark-time dependency only. Setup (its sdist vendors llama.cpp, `convert_hf_to_gguf.py` included):

    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp
    pip install /tmp/lcp/llama_cpp_python-*.tar.gz gguf sentencepiece
    export LLAMA_CPP_DIR=$(echo /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp)

The Hugging Face folder becomes GGUF with llama.cpp's own converter (F32, BF16 and Q8_0 directly;
Q4_0 by `llama_model_quantize` from the F32 file). Its Llama 4 converter reads only a byte-level BPE
tokenizer it recognises; the benchmark feeds token ids, so the synthetic folder's word-level
tokenizer is replaced in the converter's copy by the demo model's SentencePiece one, padded to the
vocabulary (the weights are the same). Where llama.cpp's Llama 4 differs from the reference: it
fixes the attention chunk at 8192 whatever the config says, so past the model's own chunk (256 for
the small synthetic model) its attention sees positions the reference masks, and its tokens part
from ours; a prompt and generation inside one chunk (128 + 32) compare the same computation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._runners import Timed

GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "q8": "q8_0", "q4": "q4_0"}
DEMO_SP = Path(__file__).resolve().parent.parent / "apps" / "demo_model" / "tokenizer.model"
# Runs the converter with Llama 4's vocabulary taken from tokenizer.model (padded to vocab_size).
_CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf as convert
from conversion.llama import Llama4Model
Llama4Model.set_vocab = lambda self: self._set_vocab_sentencepiece()
convert.main()
"""
# llama.cpp's Q4_0 recipe (its `llama-quantize ... Q4_0`: the output matrix in Q6_K, the rest Q4_0).
_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def converter_dir() -> Path | None:
    """The llama.cpp source folder holding `convert_hf_to_gguf.py` ($LLAMA_CPP_DIR), if set and there."""
    folder = os.environ.get("LLAMA_CPP_DIR")
    return Path(folder) if folder and (Path(folder) / "convert_hf_to_gguf.py").is_file() else None


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None and converter_dir() is not None


def to_gguf(src: Path, work: Path, dtype: str) -> Path:
    """`src` (a Hugging Face float folder) as a GGUF file of `dtype` (float32, bfloat16, q8, q4) in `work`."""
    out = work / f"model-{GGUF_TYPES[dtype]}.gguf"
    if out.exists():
        return out
    if dtype == "q4":  # in a child process: the C library logs every tensor
        f32 = to_gguf(src, work, "float32")
        done = subprocess.run([sys.executable, "-c", _QUANTIZE, str(f32), str(out)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"llama_model_quantize failed for {out}: {done.stderr.strip()[-300:]}")
        return out
    source = work / "gguf-source"  # the folder with the tokenizer llama.cpp's converter reads
    if not source.exists():
        source.mkdir(parents=True)
        for f in src.iterdir():
            if f.name not in ("tokenizer.json", "tokenizer_config.json"):
                (source / f.name).symlink_to(f.resolve())
        shutil.copy(DEMO_SP, source / "tokenizer.model")
    folder = converter_dir()
    if folder is None:
        raise RuntimeError("set LLAMA_CPP_DIR to a llama.cpp source folder (see benchmarks/_llama_cpp.py)")
    cmd = [sys.executable, "-c", _CONVERT, str(folder), str(source), "--outfile", str(out),
           "--outtype", GGUF_TYPES[dtype]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"convert_hf_to_gguf: {lines[-1] if lines else done.returncode}")
    return out


def runner(path: str, threads: int, context: int) -> Timed:
    """Greedy generation through `Llama.generate` (top-k 1) on `threads` threads."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads or None,
                          n_threads_batch=threads or None, verbose=False)

    def timed(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        llm.reset()
        start, out, stamps = time.perf_counter(), [], []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            stamps.append(time.perf_counter() - start)
            if len(out) == n:
                break
        return out, stamps

    return timed
