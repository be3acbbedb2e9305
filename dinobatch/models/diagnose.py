"""What a file given as a model really is: a non-PyTorch file by its first bytes, a plain
state_dict by the architecture its parameter names and shapes match (for error messages only)."""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any, Iterable

__all__ = ["describe_not_torch", "refused_global", "matching_archs"]

# torch.save's legacy (non-zip) format: a protocol-2 pickle whose first object is this magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_SIGNATURES = (  # (leading bytes, what a file starting so is)
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a Keras .h5 model?)"),
    (b"\x7fELF", "a program (ELF executable)"),
)


def describe_not_torch(data: bytes) -> str | None:
    """What the bytes are when they cannot be a torch.save file, else None (let torch.load decide)."""
    if not data:
        return "it is empty (0 bytes)"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _describe_zip(data)
    if data.startswith(_LEGACY_TORCH_MAGIC):
        return None
    if data[:1] == b"\x80":
        return "it is a Python pickle, not a file written by torch.save"
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return f"it starts like {what}"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "it starts like a WebP image"
    if _is_safetensors(data):
        return "it is a safetensors file, which dinobatch does not read; load it and torch.save its state_dict"
    text = _as_text(data[:4096])
    if text is not None:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"it is a text file (it starts {first!r})"
    return f"unrecognised content starting with bytes {data[:8].hex(' ')}"


def _describe_zip(data: bytes) -> str | None:
    """A torch.save zip holds a data.pkl; anything else in a zip, or a broken zip, is described."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return ("it is a truncated or damaged zip archive (a torch.save file cut short by a failed "
                "copy or download?)")
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return None
    return "it is a zip archive, but not one written by torch.save (it holds no data.pkl)"


def _is_safetensors(data: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data)


def _as_text(head: bytes) -> str | None:
    """The head decoded as UTF-8 when it reads as text (no NULs, at most a cut last character)."""
    if b"\x00" in head:
        return None
    for cut in range(4):  # a multi-byte character may straddle the 4096-byte cut
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def refused_global(message: str) -> str | None:
    """The Python object a weights-only load refused (e.g. 'posix.system'), when that is why it failed."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def matching_archs(state_dict: dict[str, Any], archs: Iterable[str]) -> list[str]:
    """The architectures whose parameter names and shapes (classifier rows aside) equal the state_dict's."""
    import torch

    from dinobatch.models.file import build_module

    wanted = _shape_signature({k: tuple(v.shape) for k, v in state_dict.items()})
    found = []
    for arch in archs:
        with torch.device("meta"):  # no memory, no initialisation: only names and shapes are compared
            module = build_module(arch, 1)
        if _shape_signature({k: tuple(v.shape) for k, v in module.state_dict().items()}) == wanted:
            found.append(arch)
    return found


def _shape_signature(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes with the classifier's class count dropped, so any number of labels matches."""
    out = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}  # older files lack them
    if "fc.weight" in out:
        out["fc.weight"] = out["fc.weight"][1:]
    if "fc.bias" in out:
        out["fc.bias"] = ()
    return out
