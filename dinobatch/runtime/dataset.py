"""What the decode schedulers (runtime.burst, runtime.loader) need of a dataset, and the keys of the
record each of its items decodes to: the contract between a scheduler and the decode stage it runs."""

from __future__ import annotations

from typing import Any, Callable, Protocol

__all__ = ["Rec", "DecodeDataset"]


class Rec:
    """The keys of a decode record (stages.decode.decode_item's dict), spelled only here: the record
    crosses process boundaries as a plain dict, so the keys are constants, not a class per record."""

    SHA256 = "sha256"  # the content's sha256
    ERROR = "error"  # why it has no model input (None when it has one)
    CHANGED = "changed"  # files whose bytes no longer had the sha256 (a tuple of paths)
    FACTS = "facts"  # format, width, height, mode, phash, dhash (schema.FACT_FIELDS' names)
    TENSOR = "tensor"  # the CPU-prepared model input (a DataLoader's collate stacks them)
    SLOT = "slot"  # where a burst worker wrote the model input in the shared buffer
    JPEG = "jpeg"  # a plain JPEG's bytes, left for the device to decode
    ORIENTATION = "orientation"  # that JPEG's EXIF orientation
    DEVICE_TENSOR = "device_tensor"  # the JPEG decoded on the device


class DecodeDataset(Protocol):
    """A map-style dataset whose item i is one content decoded into a record (keys: Rec), by
    whichever process the scheduler picks; engines.local.ImageDataset is the one classify uses."""

    @property
    def crop(self) -> int:
        """The model input's side: item i's pixels are crop x crop x 3 uint8."""
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item index decoded, its model input as a CPU tensor under Rec.TENSOR (a DataLoader's item)."""
        ...

    def record(self, index: int, prepare: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """Item index decoded, prepare(picture) telling where its model input went."""
        ...

    def model_input_hwc(self, image: Any) -> Any:
        """A decoded picture as the model's input: uint8 crop x crop x 3 (numpy)."""
        ...

    def window(self, lo: int, hi: int) -> "DecodeDataset":
        """Items lo..hi-1 as a dataset of their own."""
        ...

    def cost(self, index: int) -> int:
        """What item index's decoding time follows (its bytes; 0 if unknown), to balance shares."""
        ...

    def failed(self, index: int, reason: str) -> dict[str, Any]:
        """Item index's record when it could not be decoded at all (its decoder crashed the process)."""
        ...
