"""Tensor parallelism over 2 real processes started by each framework's launcher (torchrun with gloo,
mlx.launch with the ring backend): logits within 1e-5 of one process and the same greedy tokens
over 32 steps across chunk boundaries, a batch of 2 rows at different positions, each rank holding
about half the weights, a 2-shard Meta checkpoint read one shard per rank, and `apps.generate`
printing one process's text. Impossible layouts are errors that name the numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from backends import available
from folders import meta_args, write_hf, write_meta
from tiny import CONFIGS, random_weights, tiny_args

from common.tensor_parallel import Layout, LayoutError

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).parent / "dist_worker.py")
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def launcher(backend: str) -> list[str]:
    if backend not in available():
        pytest.skip(f"{backend} is not installed")
    if backend == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    launch = shutil.which("mlx.launch")
    if launch is None:
        pytest.skip("mlx.launch is not on PATH")
    return [launch, "-n", "2", "--backend", "ring", "--", sys.executable]


def run_ranks(backend: str, folder: Path, out: Path) -> tuple[dict, list[dict]]:
    """The single-process reference and each of 2 ranks' results."""
    out.mkdir(exist_ok=True)
    for cmd in ([sys.executable, WORKER], [*launcher(backend), WORKER]):
        proc = subprocess.run([*cmd, backend, str(folder), str(out)], env=ENV, cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((out / "single.json").read_text())
    return single, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


FIXTURES = {"dense_moe": CONFIGS["dense_moe"], "all_moe": CONFIGS["all_moe"],
            "kv_replicated": tiny_args(n_kv_heads=1)}  # 2 ranks, 1 KV head: each rank holds a copy


@pytest.mark.parametrize("name", list(FIXTURES))
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_two_ranks_equal_one_process(backend: str, name: str, tmp_path: Path) -> None:
    args = FIXTURES[name]
    folder = write_hf(tmp_path / "model", args, random_weights(args, seed=2))
    single, ranks = run_ranks(backend, folder, tmp_path / "out")
    for r in ranks:
        assert np.abs(np.array(r["logits"]) - np.array(single["logits"])).max() < 1e-5
        assert r["greedy"] == single["greedy"]
        assert np.abs(np.array(r["rows"]) - np.array(single["rows"])).max() < 1e-5
        # norms and routers are replicated, everything else split in two (KV heads copied when replicated)
        assert 0.45 < r["param_bytes"] / single["param_bytes"] < 0.56
    assert ranks[0]["param_bytes"] == ranks[1]["param_bytes"]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_meta_checkpoint_loads_one_shard_per_rank(backend: str, tmp_path: Path) -> None:
    folder = write_meta(tmp_path / "meta", random_weights(meta_args(), seed=5), shards=2)
    single, ranks = run_ranks(backend, folder, tmp_path / "out")
    assert single["opened"] == ["consolidated.00.pth", "consolidated.01.pth"]
    for rank, r in enumerate(ranks):
        assert r["opened"] == [f"consolidated.{rank:02d}.pth"]
        assert np.abs(np.array(r["logits"]) - np.array(single["logits"])).max() < 1e-5
        assert r["greedy"] == single["greedy"]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_generate_under_the_launcher_prints_one_process_text(backend: str) -> None:
    flags = ["--backend", backend, "--dtype", "float32", "--max-tokens", "24", "--prompt", "def parse(text):"]
    runs = []
    for cmd in ([sys.executable], launcher(backend)):
        proc = subprocess.run([*cmd, "-m", "apps.generate", *flags], env=ENV, cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(proc.stdout)
    assert runs[0].strip() and runs[1] == runs[0]


CLOSING = """
import os, sys
from torch_backend.distributed import init_world
world = init_world("cpu")
import torch._dynamo  # after the group exists, as loading a model with a compiled step imports it
world.all_sum(__import__("torch").ones(2))
world.close()
names = {open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}
with open(os.path.join(sys.argv[1], f"threads{world.rank}.txt"), "w") as f:
    f.write(" ".join(sorted(names)))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_closed_world_leaves_no_gloo_threads(tmp_path: Path) -> None:
    """A closed world's process group is gone with its threads, even where torch.compile's imports came
    after it (they hold `group.WORLD` as default arguments): left running into the interpreter's
    teardown, gloo's threads aborted a rank now and then ("terminate called without an active exception")."""
    script = tmp_path / "close.py"
    script.write_text(CLOSING)
    proc = subprocess.run([*launcher("torch"), str(script), str(tmp_path)], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        names = (tmp_path / f"threads{rank}.txt").read_text().split()
        assert "python" in names and not any("gloo" in n for n in names), names


def test_impossible_layouts_name_the_numbers() -> None:
    with pytest.raises(LayoutError, match="n_heads 4 is not divisible by the world size 3"):
        Layout(0, 3).local_args(CONFIGS["dense_moe"])
    with pytest.raises(LayoutError, match="n_kv_heads 3 and the world size 2"):
        Layout(1, 2).local_args(tiny_args(n_heads=6, n_kv_heads=3))
    with pytest.raises(LayoutError, match="expert hidden size 48 is not divisible by 5"):
        Layout(0, 5).local_args(tiny_args(n_heads=5, n_kv_heads=5, ffn_hidden_dim=100, vocab_size=125))
    with pytest.raises(LayoutError, match="rank 2 is outside a world of 2"):
        Layout(2, 2)
    args = CONFIGS["dense_moe"]
    local = Layout(1, 2).local_args(args)
    assert (local.n_heads, local.n_kv_heads, local.ffn_hidden_dim, local.moe_hidden_dim, local.vocab_size) == (
        2, 1, 48, 24, 64)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_quantized_folder_splits_weights_scales_and_biases(backend: str, tmp_path: Path) -> None:
    from apps.convert import convert
    from common.args import QuantizationArgs

    args = tiny_args(ffn_hidden_dim=128, moe_hidden_dim=64)  # every split width a multiple of the group of 32
    src = write_hf(tmp_path / "float", args, random_weights(args, seed=4))
    folder = convert(src, tmp_path / "q4", QuantizationArgs(group_size=32, bits=4), dtype="float32")
    single, ranks = run_ranks(backend, folder, tmp_path / "out")
    for r in ranks:
        assert np.abs(np.array(r["logits"]) - np.array(single["logits"])).max() < 1e-4
        assert r["greedy"] == single["greedy"]
        assert 0.4 < r["param_bytes"] / single["param_bytes"] < 0.6
