"""python -m checkpoints inspect|verify|export|convert: look into, check and convert checkpoints.

  inspect PATH                 a checkpoint: step, tokens, layout, code version, model, tensors; a run or its
                               checkpoints/ directory: every checkpoint, its size and validity, and `latest`
  verify PATH [--no-checksums] sizes and sha256 of every file against the manifest (exit 1 if any differs)
  export PATH --out DIR        DIR/model.safetensors + DIR/config.toml for HopeLM on one process
                               (checkpoints.export.load_exported)
  convert PATH --to megatron-core --out FILE [--tp N]
                               the weights under megatron-core's names, one file per tensor-parallel rank
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkpoints.errors import CheckpointError
from checkpoints.export import export, model_config, to_megatron_core
from checkpoints.layout import checkpoints_root, read_latest, step_dirs
from checkpoints.manifest import problems, read_manifest
from checkpoints.safe_reader import SafeFileSystemReader
from checkpoints.state import RUN_STATE


def checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give runs/NAME/checkpoints/step_NNNNNNNN")
    if not (path / RUN_STATE).is_file() and not (path / "manifest.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no manifest.json); give runs/NAME/checkpoints/"
                              "step_NNNNNNNN, or a run directory to `inspect` to list its checkpoints")
    return path


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect_run(root: Path) -> None:
    dirs = step_dirs(root)
    if not dirs:
        raise CheckpointError(f"{root} holds no step_* checkpoint")
    latest = read_latest(root)
    print(f"{'checkpoint':<16} {'MiB':>9}  state")
    for d in dirs:
        found = problems(d, checksums=False)
        print(f"{d.name:<16} {size(d) / 2**20:9.2f}  {'complete' if not found else 'BROKEN: ' + found[0]}"
              f"{'  <- latest' if d == latest else ''}")


def inspect_checkpoint(path: Path) -> None:
    run = json.loads((path / RUN_STATE).read_text())
    cfg = model_config(path)
    layout = run["layout"]
    print(f"checkpoint: {path}")
    print(f"step: {run['step']} | tokens consumed: {run['consumed_tokens']:,} | loader epoch {run['loader']['epoch']},"
          f" sample {run['loader']['consumed_samples']}")
    print(f"saved by: {layout['world_size']} rank(s), tp {layout['tensor_parallel']} x pp "
          f"{layout['pipeline_parallel']} x dp {layout['data_parallel']}, {layout['engine']}")
    print(f"code: {run['code_version']['package']} {run['code_version']['commit']}")
    print(f"model: {cfg.arch}, d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}")
    print(f"files: {len(read_manifest(path)['files'])}, {size(path) / 2**20:.2f} MiB")
    metadata = SafeFileSystemReader(str(path)).read_metadata()
    for key, meta in sorted(metadata.state_dict_metadata.items()):
        print(f"  {key:<64} {str(tuple(meta.size)):<18} {str(meta.properties.dtype).removeprefix('torch.')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect").add_argument("path", type=Path)
    verify = sub.add_parser("verify")
    verify.add_argument("path", type=Path)
    verify.add_argument("--no-checksums", action="store_true", help="check sizes only")
    exp = sub.add_parser("export")
    exp.add_argument("path", type=Path)
    exp.add_argument("--out", type=Path, required=True)
    conv = sub.add_parser("convert")
    conv.add_argument("path", type=Path)
    conv.add_argument("--to", choices=["megatron-core"], required=True)
    conv.add_argument("--out", type=Path, required=True, help="a .safetensors file (with --tp N: one per rank)")
    conv.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            root = checkpoints_root(args.path) if (args.path / "checkpoints").is_dir() else args.path
            if step_dirs(root):
                inspect_run(root)
            else:
                inspect_checkpoint(checkpoint_dir(args.path))
        elif args.command == "verify":
            found = problems(checkpoint_dir(args.path), checksums=not args.no_checksums)
            for problem in found:
                print(f"{args.path}: {problem}")
            print(f"{args.path}: {'INVALID' if found else 'ok'}")
            return 1 if found else 0
        elif args.command == "export":
            print(f"wrote {export(checkpoint_dir(args.path), args.out)}")
        else:
            for path in to_megatron_core(checkpoint_dir(args.path), args.out, args.tp):
                print(f"wrote {path}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
