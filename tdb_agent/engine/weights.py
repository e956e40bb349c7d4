"""Reading a checkpoint's weights safely.

safetensors holds tensors only, so a folder that has `model.safetensors` (or a sharded
index of them) is read from it, whatever `.bin` lies beside it (`use_safetensors=True`).
A `.bin` is a pickle, and unpickling can run arbitrary code: it is read only with
PyTorch's weights-only unpickler (`weights_only=True`, explicit, whatever the defaults of
the installed versions). When that unpickler rejects the file we refuse the checkpoint
in one line of our own; we never suggest turning the protection off.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from tdb_agent.errors import TdbError

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


class UnsafeCheckpoint(TdbError):
    """A pickled checkpoint holding more than tensors: refused, never unpickled."""


def weight_kwargs(folder: Path | None) -> dict:
    """from_pretrained arguments: safetensors where the local folder has them; weights-only .bin."""
    kwargs: dict = {"weights_only": True}
    if folder is not None and any((folder / name).is_file() for name in SAFETENSORS):
        kwargs["use_safetensors"] = True
    return kwargs


def load_weights(src: str, folder: Path | None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(src, **kwargs)` with `weight_kwargs`; a .bin the
    weights-only unpickler rejects becomes an `UnsafeCheckpoint` (one line, no traceback)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(src, **weight_kwargs(folder), **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it pickles {found.group(1)}, not only tensors" if found else "it holds objects other than tensors"
        files = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) if folder is not None else "the .bin weights"
        raise UnsafeCheckpoint(
            f"refused to read {files} of {src}: {what}. A .bin checkpoint is a pickle, read here only with "
            "PyTorch's weights-only unpickler, because unpickling anything else can run code. Convert the "
            "checkpoint to model.safetensors where you trust it, or use a safetensors release") from None
