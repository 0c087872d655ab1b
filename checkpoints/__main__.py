"""python -m checkpoints inspect|verify|export|convert: look into, check and convert checkpoints.

  inspect PATH                 a checkpoint: step, tokens, layout, code version, model, tensors, bytes; a run or
                               its checkpoints/ directory: every checkpoint, its size and state, and `latest`
  verify PATH [--no-checksums] sizes and sha256 of every file against the manifest, and what the files say of
                               each other (DCP metadata read safely, its data within the files, the rank files):
                               exit 1 listing what is wrong
  export PATH --out DIR        DIR/model.safetensors + DIR/config.toml for HopeLM on one process
                               (checkpoints.export.load_exported); DIR is new, empty or an earlier export
  convert PATH --to megatron-core --out FILE [--tp N]
                               the weights under megatron-core's names, one file per tensor-parallel rank
                               (FILE, or FILE_tp0 ... FILE_tp{N-1} with the same suffix)
  convert FILE --from megatron-core --config TOML --out DIR
                               back: an export directory of the weights `--to megatron-core` wrote to FILE,
                               for the [model] of TOML (the run's config.toml)
Export and convert refuse a checkpoint that fails `verify`, and never overwrite other files than their own.
Exit status 1 with a one-line error otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checkpoints.describe import checkpoint_dir, describe_checkpoint, describe_run, run_checkpoints
from checkpoints.errors import CheckpointError
from checkpoints.export import export, from_megatron_core, to_megatron_core
from checkpoints.manifest import problems

MEGATRON_CORE = "megatron-core"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m checkpoints", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="a checkpoint, or a run's checkpoints").add_argument("path", type=Path)
    verify = sub.add_parser("verify", help="check a checkpoint's files against its manifest and each other")
    verify.add_argument("path", type=Path)
    verify.add_argument("--no-checksums", action="store_true", help="skip the sha256 of every file")
    exp = sub.add_parser("export", help="model.safetensors + config.toml for HopeLM")
    exp.add_argument("path", type=Path)
    exp.add_argument("--out", type=Path, required=True, help="the export directory")
    conv = sub.add_parser("convert", help="to (or from) megatron-core's parameter names")
    conv.add_argument("path", type=Path, help="a checkpoint (--to), or the file --to wrote (--from)")
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=[MEGATRON_CORE])
    direction.add_argument("--from", dest="source", choices=[MEGATRON_CORE])
    conv.add_argument("--out", type=Path, required=True, help="--to: a .safetensors file; --from: a directory")
    conv.add_argument("--tp", type=int, default=1, help="--to: tensor-parallel ranks (one file each)")
    conv.add_argument("--config", type=Path, help="--from: the config.toml of the run the weights come from")
    return p


def inspect_path(path: Path) -> None:
    root = run_checkpoints(path) if path.is_dir() else None
    for line in describe_run(root) if root is not None else describe_checkpoint(checkpoint_dir(path)):
        print(line)


def verify(path: Path, checksums: bool) -> int:
    found = problems(checkpoint_dir(path), checksums)
    for problem in found:
        print(f"{path}: {problem}")
    print(f"{path}: {'INVALID' if found else 'ok'}{'' if checksums else ' (no sha256)'}")
    return 1 if found else 0


def convert(args: argparse.Namespace) -> None:
    if args.to:
        for path in to_megatron_core(checkpoint_dir(args.path), args.out, args.tp):
            print(f"wrote {path}")
        return
    if args.config is None:
        raise CheckpointError("convert --from megatron-core needs --config: the config.toml of the run the "
                              "weights come from (its [model] table)")
    print(f"wrote {from_megatron_core(args.path, args.config, args.out)}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "inspect":
            inspect_path(args.path)
        elif args.command == "verify":
            return verify(args.path, not args.no_checksums)
        elif args.command == "export":
            print(f"wrote {export(checkpoint_dir(args.path), args.out)}")
        else:
            convert(args)
    except (CheckpointError, OSError) as e:  # OSError: a path that cannot be read or written
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
