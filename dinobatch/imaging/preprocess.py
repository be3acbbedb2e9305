"""The model's input from a decoded picture: resize, centre crop, EXIF orientation."""

from __future__ import annotations

from dinobatch.models.file import Preprocessing


def model_input(image, prep: Preprocessing):
    """Resize the shorter side and centre-crop in one resampling step; uint8 CHW (normalised on device)."""
    import torchvision.transforms.functional as F

    return F.pil_to_tensor(_resized_crop(image, prep))


def model_input_hwc(image, prep: Preprocessing):
    """model_input's pixels as a numpy HWC array (channels-last, as burst decoding hands them over)."""
    import numpy as np

    return np.asarray(_resized_crop(image, prep))


def _resized_crop(image, prep: Preprocessing):
    """The centre crop of the picture resized on its shorter side, in one resampling step.

    Resampling only the source box that lands in the crop gives torchvision's resize-then-crop
    (within one grey level) without ever materialising the resized image, so a 300000x1 strip
    costs a crop's worth of memory, not gigabytes.
    """
    from PIL import Image

    w, h = image.size
    if w <= h:
        nw, nh = prep.resize, int(prep.resize * h / w)
    else:
        nw, nh = int(prep.resize * w / h), prep.resize
    c = prep.crop
    left, top = int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    return image.resize((c, c), resample[prep.interpolation], box=box)


_EXIF_ORIENT = {  # EXIF orientation -> the same transform as PIL's exif_transpose, on a CHW tensor
    2: lambda x: x.flip(2), 3: lambda x: x.flip(1).flip(2), 4: lambda x: x.flip(1),
    5: lambda x: x.transpose(1, 2), 6: lambda x: x.transpose(1, 2).flip(2),
    7: lambda x: x.transpose(1, 2).flip(1).flip(2), 8: lambda x: x.transpose(1, 2).flip(1),
}


def orient_tensor(x, orientation: int):
    """Apply an EXIF orientation to a CHW image tensor (what ImageOps.exif_transpose does to a picture)."""
    transform = _EXIF_ORIENT.get(orientation)
    return transform(x) if transform else x


def device_model_input(image, prep: Preprocessing):
    """Resize the shorter side (antialiased) and centre-crop a CHW uint8 tensor where it lies."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    mode = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC}[prep.interpolation]
    return F.center_crop(F.resize(image, [prep.resize], interpolation=mode, antialias=True), [prep.crop])
