"""Reading a user's ``.npy`` file without trusting it: the header is checked against the file
before anything is allocated, and nothing is unpickled."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from vprompt.errors import VPromptError

MAX_ARRAY_BYTES = 1 << 30
"""Largest array :func:`read_npy` reads (1 GiB) unless told otherwise."""


class ArrayFileError(VPromptError, ValueError):
    """A file that is not one readable numeric ``.npy`` array."""


def read_npy(path: str | os.PathLike[str], *, max_bytes: int = MAX_ARRAY_BYTES) -> NDArray:
    """The numeric array in a ``.npy`` file (``np.save``), refusing anything else.

    Raises:
        ArrayFileError: Not a ``.npy`` file (a ``.npz`` archive, another format, a header
            numpy cannot parse), an object or non-numeric dtype, a shape whose data the file
            does not hold, or an array over ``max_bytes``. The message starts with the path.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            magic = fh.read(6)
            if magic.startswith(b"PK"):
                raise ArrayFileError(
                    f"{p}: a .npz archive; expected one .npy array (as np.save writes it)"
                )
            if magic != b"\x93NUMPY":
                raise ArrayFileError(f"{p}: not a .npy file (as np.save writes it)")
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ArrayFileError(f"{p}: .npy format version {version} is not supported")
            if dtype.hasobject or dtype.kind not in "biuf":
                raise ArrayFileError(f"{p}: holds {dtype} values; expected numbers")
            need = math.prod(shape) * dtype.itemsize
            held = size - fh.tell()
            if need > held:
                raise ArrayFileError(
                    f"{p}: its header claims shape {shape} ({need} bytes) but the file holds "
                    f"{held} bytes of data"
                )
            if need > max_bytes:
                raise ArrayFileError(f"{p}: array of {need} bytes is over the limit of {max_bytes}")
            data = np.fromfile(fh, dtype=dtype, count=math.prod(shape))
    except ArrayFileError:
        raise
    except FileNotFoundError:
        raise ArrayFileError(f"{p}: no such file") from None
    except OSError as exc:
        raise ArrayFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # a header numpy cannot parse
        raise ArrayFileError(f"{p}: not a readable .npy file ({exc})") from None
    return data.reshape(shape, order="F" if fortran else "C")
