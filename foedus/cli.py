"""The ``model`` command: look inside a foedus model file, and export it to what others load.

`inspect` prints each tensor's name, dtype, shape and size, the total and the file's SHA-256 (the
digest `sha256sum` prints, to compare two copies); `export` writes the tensors as safetensors
(the format PyTorch, JAX and Hugging Face load weights from) or NumPy `.npz`, atomically.
Exit codes: 0 ok, 1 the output could not be written, 2 bad input (a file that is not a model,
an existing output without --force), one line each, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

import numpy as np

from foedus import model
from foedus.command.arguments import command, program
from foedus.command.exits import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from foedus.command.output import quiet_when_stdout_closes, stdout_closed
from foedus.command.table import table_lines
from foedus.command.usage import UsageError, fail, parse_arguments, unexpected
from foedus.durable.files import replace_file
from foedus.protos.dtypes import is_bfloat16

PROGRAM: Final = "model"
FORMATS: Final = {".safetensors": "safetensors", ".npz": "npz"}  # OUT's suffix -> --format
# np.savez's own parameters: a tensor of one of these names cannot be a keyword of it.
_SAVEZ_PARAMETERS: Final = frozenset({"file", "allow_pickle"})

EPILOG = f"""\
exit status:
  {EXIT_OK}    done
  {EXIT_FAILURE}    the output could not be written
  {EXIT_BAD_INPUT}    bad command line, a FILE that is not a model file, or an OUT that exists
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser, commands = program(
        PROGRAM,
        textwrap.fill(
            "Look inside a foedus model file (last_model.pbuf, best_model.pbuf: an OpenFL "
            "ModelProto) and export it to safetensors or NumPy .npz."
        ),
        epilog=EPILOG,
    )
    summary = "Each tensor's name, dtype, shape and bytes, the total, and the file's SHA-256."
    inspect = command(commands, "inspect", summary, epilog=EPILOG)
    inspect.add_argument("file", type=Path, metavar="FILE", help="a foedus model file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    summary = "Write the model's tensors to OUT as safetensors or NumPy .npz, atomically."
    export = command(
        commands,
        "export",
        summary,
        description=textwrap.fill(
            f"{summary} safetensors keeps every dtype (bfloat16 as BF16); .npz has no bfloat16, "
            "so bfloat16 tensors are written as float32, which holds each value exactly."
        ),
        epilog=EPILOG,
    )
    export.add_argument("file", type=Path, metavar="FILE", help="a foedus model file")
    export.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT", help="the file to write"
    )
    export.add_argument(
        "--format",
        choices=sorted(set(FORMATS.values())),
        help="default: from OUT's suffix (.safetensors or .npz)",
    )
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser


@quiet_when_stdout_closes
def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the model command line; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    args = parse_arguments(build_parser(), argv)
    if isinstance(args, int):
        return args
    out = out or sys.stdout
    try:
        if args.command == "inspect":
            return _inspect(args.file, as_json=args.json, out=out)
        return _export(args.file, args.output, args.format, force=args.force, out=out)
    except (UsageError, model.ModelFileError) as error:
        return fail(PROGRAM, str(error), EXIT_BAD_INPUT)
    except model.StorageError as error:
        return fail(PROGRAM, str(error), EXIT_FAILURE)
    except BrokenPipeError:  # `model inspect FILE | head`: the reader has what it wanted
        return stdout_closed()
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        return fail(PROGRAM, f"{where}{error.strerror or error}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return fail(PROGRAM, "interrupted", EXIT_FAILURE)
    except Exception as error:
        return fail(PROGRAM, unexpected(error), EXIT_FAILURE)


def _inspect(path: Path, *, as_json: bool, out: TextIO) -> int:
    tensors = model.load(path, copy=False)
    digest = _sha256(path)
    total = sum(array.nbytes for array in tensors.values())
    size = path.stat().st_size
    if as_json:
        rows = [
            {
                "name": name,
                "dtype": _dtype_name(array),
                "shape": list(array.shape),
                "bytes": array.nbytes,
            }
            for name, array in tensors.items()
        ]
        document = {
            "file": str(path),
            "file_bytes": size,
            "sha256": digest,
            "tensors": rows,
            "tensor_bytes": total,
        }
        print(json.dumps(document, indent=2), file=out)
        return EXIT_OK
    table = [
        [name, _dtype_name(array), _shape(array.shape), str(array.nbytes)]
        for name, array in tensors.items()
    ]
    for line in table_lines(["TENSOR", "DTYPE", "SHAPE", "BYTES"], table):
        print(line, file=out)
    print(
        f"total: {len(table)} tensors, {total} bytes of values; the file is {size} bytes", file=out
    )
    print(f"sha256: {digest}  {path}", file=out)
    return EXIT_OK


def _export(path: Path, output: Path, chosen: str | None, *, force: bool, out: TextIO) -> int:
    kind = chosen or FORMATS.get(output.suffix.lower())
    if kind is None:
        raise UsageError(
            f"{output}: cannot tell the format from its suffix; name it .safetensors or .npz, "
            "or give --format"
        )
    if output.exists() and not force:
        raise UsageError(f"{output}: exists; give --force to replace it")
    if output.exists() and path.exists() and output.samefile(path):
        raise UsageError(f"{output}: is FILE itself; write the export elsewhere")
    tensors = model.load(path, copy=False)
    widened: list[str] = []
    if kind == "safetensors":
        # Imported here: only an export to it needs the package (and its Rust extension).
        from safetensors.numpy import save_file  # noqa: PLC0415

        arrays = {name: np.asarray(array, order="C") for name, array in tensors.items()}
        # It saves to a file name: the temporary file's (`replace_file` keeps it open).
        replace_file(output, lambda file: save_file(arrays, file.name))
    else:
        clashes = sorted(_SAVEZ_PARAMETERS & tensors.keys())
        if clashes:
            raise UsageError(
                f"{path}: tensor {clashes[0]!r}: .npz cannot hold a tensor of that name with "
                "numpy.savez; export to .safetensors instead"
            )
        widened = [name for name, array in tensors.items() if is_bfloat16(array.dtype)]
        arrays = {
            name: array.astype(np.float32) if name in widened else array
            for name, array in tensors.items()
        }

        # To an open file, so savez adds no .npz to the name.
        replace_file(output, lambda file: np.savez(file, allow_pickle=False, **arrays))
    print(f"{output}: {len(tensors)} tensors as {kind}", file=out)
    if widened:
        print(
            f"bfloat16 written as float32 (exact; .npz has no bfloat16): {', '.join(widened)}",
            file=out,
        )
    return EXIT_OK


def _sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes, as `sha256sum` prints it."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _dtype_name(array: model.Array) -> str:
    return "bfloat16" if is_bfloat16(array.dtype) else array.dtype.name


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(dimension) for dimension in shape) + "]"


if __name__ == "__main__":
    raise SystemExit(main())
