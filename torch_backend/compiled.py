"""The CPU decode step through `torch.compile`: `Transformer.decode_rows` traced once into one graph
whose element-wise work inductor fuses into a few generated C++ loops, called from a generated C++
wrapper (`cpp_wrapper`), so a step costs its products instead of hundreds of eager operations (each
a Python call and a kernel dispatch). Measured on a 2-core x86 CPU (small benchmark model, float32):
6.5 ms a step eagerly, 5.8 compiled with inductor's Python wrapper, 5.1 with the C++ one.

What makes the step one graph without recompiles:
- an expert id is read with `.item()` as a symbolic integer (`capture_scalar_outputs`), so indexing
  an expert's weights is one traced view whatever the id, not a constant per expert;
- the growing tables (RoPE rotations, NoPE temperatures) and the global caches' slot axis are marked
  dynamic, so their growth reuses the graph;
- the model code takes its compile-friendly branch where `torch.compiler.is_compiling()` (plain
  `F.linear`, real arithmetic for the rotations, no pointer checks on fused storage).

The first call compiles (about 25 s on a 2-core CPU; about 4 s with inductor's on-disk cache warm);
`load(compile_decode=True)` makes that call while loading (`DecodeRunner.warm_up`). Where compiling
fails (no C++ compiler, an unsupported platform), the step warns once and runs eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as fx_config

from torch_backend.cache import KVCache
from torch_backend.model import Cache, Transformer
from torch_backend.replay import Graph, GraphReplay

Step = Callable[[torch.Tensor, torch.Tensor, list[Cache]], torch.Tensor]
KEPT_REPLAYS = 4


class CompiledStep:
    """`model.decode_rows` compiled; called like it (tokens [B], positions [B], caches) -> logits [B, V]."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        # emulate_precision_casts: fused bfloat16/float16 element-wise chains round where eager torch
        # rounds (after each operation), so the compiled step computes the numbers the eager one does.
        # No size / alignment / scalar asserts in the generated code: they re-check, every step, the
        # ~120 inputs that the guards (or the replay's identity checks) already vouch for; measured on
        # the small model's 4-bit step over a greedy decode (2-core x86 CPU, both variants in one process):
        # 1.89 -> 1.82 ms.
        self._options = {"emulate_precision_casts": True, "cpp_wrapper": True, "size_asserts": False,
                         "alignment_asserts": False, "scalar_asserts": False}
        self._compiled: Step | None = torch.compile(model.decode_rows, backend=self._backend, dynamic=False)
        self._ran: list[tuple[Graph, tuple, Any]] = []  # the graphs the current guarded call ran
        # The replays of the latest guarded calls, the most recent first: a new generation's caches start
        # as small as the previous generation's started, so its first steps replay an earlier check.
        self._replays: list[GraphReplay] = []
        self.counts = {"guarded": 0, "replayed": 0}

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """Inductor's compile of one traced graph, wrapped to note each run (for `GraphReplay`)."""
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(gm, example_inputs, config_patches=self._options)
        names = [getattr(n.meta.get("grapharg"), "source", None) for n in gm.graph.find_nodes(op="placeholder")]
        graph = Graph(fn, [n.name for n in names] if all(n is not None for n in names) else None)

        def run(*inputs: Any) -> Any:
            outputs = fn(*inputs)
            self._ran.append((graph, inputs, outputs))
            return outputs

        return run

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, caches: Sequence[Cache]) -> torch.Tensor:
        caches = list(caches)
        if self._compiled is None:
            return self.model.decode_rows(tokens, positions, caches)
        local = {"self": self.model, "tokens": tokens, "positions": positions, "cache": caches}
        # oneDNN off: one-row products take torch's own matrix-vector kernels, as eagerly
        # (`torch_backend.fused.linear`); measured on the small benchmark model, bfloat16 decode went
        # from 138 to 180 tokens/s that way. The flag itself is switched (a process-wide switch,
        # restored right after): torch.backends.mkldnn.flags() also sets oneDNN's TF32 switch, which
        # warns on CPU-only builds.
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            for i, replay in enumerate(self._replays):
                out = replay(local)
                if out is not None:
                    self.counts["replayed"] += 1
                    if i:
                        self._replays.insert(0, self._replays.pop(i))
                    return out
            return self._guarded(local)
        finally:
            torch.backends.mkldnn.enabled = mkldnn

    def _guarded(self, local: dict[str, Any]) -> torch.Tensor:
        """The step through torch.compile's checks (compiling where they fail); a replay of it follows."""
        tokens, positions, caches = local["tokens"], local["positions"], local["cache"]
        self._mark_growing(caches)
        self.counts["guarded"] += 1
        previous = dynamo_config.capture_scalar_outputs, fx_config.use_duck_shape
        # Set and restored directly rather than through `config.patch` (which builds a context object per
        # call). Without duck shaping a global cache that happens to hold as many slots as a chunk ring
        # still gets its own (dynamic) size.
        dynamo_config.capture_scalar_outputs, fx_config.use_duck_shape = True, False
        self._ran.clear()
        try:
            out = self._compiled(tokens, positions, caches)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the same step, eagerly
            if not _compiler_failure(e):
                raise
            warnings.warn(f"torch.compile of the decode step failed, decoding eagerly: {str(e).splitlines()[0]}",
                          RuntimeWarning, stacklevel=3)
            self._compiled = None
            return self.model.decode_rows(tokens, positions, caches)
        finally:
            dynamo_config.capture_scalar_outputs, fx_config.use_duck_shape = previous
        ran, self._ran = self._ran, []
        # one graph that was the whole step: replayed while its inputs stay the ones just checked
        replay = (GraphReplay.check(*ran[0], out, local, {"tokens", "positions"},
                                    box_ints=bool(self._options.get("cpp_wrapper")), rebind_locals={"cache"},
                                    kinds=_cache_kinds) if len(ran) == 1 else None)
        if replay is not None:
            self._replays = [replay, *self._replays[: KEPT_REPLAYS - 1]]
        return out

    def _mark_growing(self, caches: list[Cache]) -> None:
        """Axes that grow during a generation, dynamic from the first trace on (so growth never recompiles)."""
        for table in (self.model.rope, self.model.temperatures):
            if table is not None and table.rows is not None:
                torch._dynamo.maybe_mark_dynamic(table.rows, 0)
        for c in caches:
            if isinstance(c, KVCache) and c.keys is not None:  # a chunk ring keeps its size
                torch._dynamo.maybe_mark_dynamic(c.keys, 2)
                torch._dynamo.maybe_mark_dynamic(c.values, 2)


def _cache_kinds(local: dict[str, Any]) -> tuple:
    """What a step's graph assumes of its caches besides their tensors' layouts: each one's type, rows and
    chunk size (a ring's slot arithmetic is traced with it), in layer order."""
    return tuple((type(c), c.batch_size, getattr(c, "chunk_size", None)) for c in local["cache"])


def _compiler_failure(e: Exception) -> bool:
    """Whether `e` came from tracing or compiling (not from the model's own checks)."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError, Unsupported

    return isinstance(e, BackendCompilerFailed | Unsupported | TorchRuntimeError)
