"""Convert a Llama 4 checkpoint to an MLX folder, optionally quantized: `python -m apps.convert`.

    python -m apps.convert --model SRC --out DST [-q] [--q-bits 4|8] [--q-group-size 32|64|128]
                           [--dtype float16|bfloat16|float32] [--force]

SRC is a Meta native folder (one or many model-parallel `consolidated.NN.pth`) or a Hugging Face
folder. DST gets the layout mlx-lm reads and writes: `config.json` (the source config as
`Llama4ForConditionalGeneration`, plus `"quantization": {"group_size": G, "bits": B}` with `-q`),
`model-0000K-of-0000N.safetensors` shards of at most 5 GB with `model.safetensors.index.json`,
and the tokenizer files. Without `-q` only the dtype changes.

Memory: tensors are converted one at a time, row block by row block, from memory-mapped sources,
so the peak stays near the largest single tensor, whatever the model's size. Safety: everything is
written into a hidden folder beside DST, which is renamed into place only once complete; on any
failure it is removed. Exit codes: 0 ok, 2 usage, 1 any other error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from apps.cli import report_errors
from apps.convert_io import PthSource, SafetensorsSource, ShardWriter
from apps.convert_plan import Group, open_canonical, output_config, plan_groups, shard_groups, write_group
from common.args import QuantizationArgs
from common.files import ModelFolderError, find_checkpoint, read_args

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.convert",
                                description="Convert a Meta native or Hugging Face Llama 4 checkpoint to an MLX "
                                            "folder (mlx-lm layout), optionally quantized.")
    p.add_argument("--model", required=True,
                   help="source folder (Meta native or Hugging Face) or Hugging Face Hub id org/name")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of an org/name --model")
    p.add_argument("--out", required=True, help="output folder (must not exist, unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize linears, experts and the embedding")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="bits per weight (default 4)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="weights per scale and bias (default 64)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="float dtype of the output (and of scales/biases); default: as stored")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    return p


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"--out {dst} must be outside the source folder {src}")
    if dst.resolve() in src.resolve().parents:
        raise ValueError(f"--out {dst} contains the source folder {src}; --force would delete it")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; choose another --out or pass --force to replace it")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"the parent folder of --out does not exist: {dst.parent}")


def _check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + (64 << 20):
        raise OSError(f"not enough disk space in {folder}: the output needs {need / 2**30:.2f} GB, "
                      f"{free / 2**30:.2f} GB are free")


def convert(src: str | Path, dst: str | Path, quantization: QuantizationArgs | None = None,
            dtype: str | None = None, force: bool = False, show_progress: bool = False) -> Path:
    """Write the MLX folder `dst` from the checkpoint in `src`; returns `dst`."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_paths(src, dst, force)
    files = find_checkpoint(src)
    args = read_args(files)
    if args.quantization is not None:
        raise ModelFolderError(f"{src} is already quantized; convert from the float checkpoint")
    if files.layout == "meta":
        canonical, text = open_canonical([PthSource(p) for p in files.weight_files], args, meta=True)
    else:
        canonical, text = open_canonical([SafetensorsSource(files.weight_files)], args, meta=False)
    if text is not args:
        print(f"warning: {src} has a vision_config but no vision weights; converting the text model",
              file=sys.stderr)
    args = text
    groups = plan_groups(canonical, args, quantization, dtype)
    shards = shard_groups(groups)
    _check_space(dst.parent, sum(g.nbytes for g in groups))
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        _write_shards(tmp, shards, canonical, show_progress)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        config = output_config(files, args, quantization, groups[0].out_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))  # last: only now does it look like a model
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


class _Progress:
    """Bytes and tensors written, as a bar on stderr when it is a terminal."""

    def __init__(self, total_bytes: int, tensors: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                         file=sys.stderr, leave=False, disable=not enabled or not sys.stderr.isatty())
        self._tensors, self._done = tensors, 0

    def tensor_done(self, nbytes: int) -> None:
        self._done += 1
        self._bar.set_postfix_str(f"{self._done}/{self._tensors} tensors", refresh=False)
        self._bar.update(nbytes)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def _write_shards(tmp: Path, shards: list[list[Group]], canonical: Any, show_progress: bool) -> None:
    total = sum(g.nbytes for shard in shards for g in shard)
    weight_map: dict[str, str] = {}
    with _Progress(total, sum(len(s) for s in shards), show_progress) as bar:
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            with ShardWriter(tmp / name, [e for g in shard for e in g.entries]) as writer:
                for group in shard:
                    write_group(writer, group, canonical[group.name])
                    bar.tensor_done(group.nbytes)
                writer.finish()
            weight_map.update({e.name: name for g in shard for e in g.entries})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _publish(tmp: Path, dst: Path) -> None:
    """Move the finished folder into place; an existing `dst` (allowed by --force) goes only after."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / dst.name)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quantization = QuantizationArgs(group_size=args.q_group_size, bits=args.q_bits) if args.quantize else None

    def body() -> int:
        from common.hub import resolve_model

        source = resolve_model(args.model, args.revision)  # a Hub id becomes its cached snapshot
        out = convert(source, args.out, quantization, args.dtype, args.force, show_progress=True)
        what = f"{quantization.bits}-bit, group size {quantization.group_size}" if quantization else "not quantized"
        print(f"wrote {out} ({what})", file=sys.stderr)
        return 0

    return report_errors(body, args.verbose, interrupted="interrupted; nothing was written to --out")


if __name__ == "__main__":
    raise SystemExit(main())
