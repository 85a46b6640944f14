#!/usr/bin/env python3
"""Generate the fixtures for `tests/augment.rs`.

Run from the repository root with a Python that has Pillow, numpy, timm,
torch, torchvision and safetensors:

    /work/pyenv/bin/python tools/make_augment_fixtures.py

Output: ``tests/fixtures/augment/expected.safetensors`` (uint8 HWC images),
deterministic for given library versions (recorded in the metadata):

* ``input/<name>``: the op inputs, a 64x48 crop of ``assets/photos/chelsea.png``,
  a 24x16 synthetic image (full-range, narrow-range and constant channels)
  a 5x2 one (smaller than the SMOOTH kernel) and a 6x6 one (quarter turns).
* ``op/<input>/<Op>/<magnitude>/<sign>/<resample>``: timm's level function
  and op function (``LEVEL_TO_ARG`` / ``NAME_TO_OP``, with the fill and
  resampling ``AugmentOp`` passes) at a fixed magnitude, with
  ``_randomly_negate`` forced to keep (``+``) or negate (``-``) the argument.
* ``rrc/<top>_<left>_<height>_<width>/<out_h>x<out_w>``: torchvision
  ``F.resized_crop`` of chelsea.png with PIL bicubic.

Pillow 13 rejects ``ImageOps.posterize(img, 0)``, which timm's
``PosterizeIncreasing`` requests at magnitude 10; those cases use the
formula of the older Pillow releases timm was written against
(``i & ~(2 ** (8 - bits) - 1)``, all zero), as the Rust port does.
"""

import json
import os

import numpy as np
import PIL
import timm
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.numpy import save_file
from timm.data import auto_augment as aa
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_INCEPTION_MEAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "augment", "expected.safetensors")

# BEiT's RandAugment hparams as timm's create_transform builds them for the
# ImageNet default mean; translate_const as for a 48-pixel image.
FILL = tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)
TRANSLATE_CONST = int(48 * 0.45)

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

SIGNED = {
    "Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "TranslateX", "TranslateY",
}
UNSIGNED = [
    "AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness",
]


def inputs():
    chelsea = Image.open(os.path.join(ROOT, "assets", "photos", "chelsea.png")).convert("RGB")
    crop = chelsea.crop((180, 80, 244, 128))
    h, w = 16, 24
    y, x = np.mgrid[0:h, 0:w]
    synthetic = np.stack(
        [
            np.minimum(255, x * 12 + (y % 3) * 5),  # full range, saturated ends
            90 + (x * y * 7 + y) % 41,  # narrow range
            np.full((h, w), 77),  # one level
        ],
        axis=-1,
    ).astype(np.uint8)
    square = (np.arange(6 * 6 * 3).reshape(6, 6, 3) * 37 % 256).astype(np.uint8)
    tiny = (np.arange(5 * 2 * 3).reshape(2, 5, 3) * 17 % 256).astype(np.uint8)
    return chelsea, {
        "chelsea": crop,
        "synthetic": Image.fromarray(synthetic),
        "tiny": Image.fromarray(tiny),
        "square": Image.fromarray(square),
    }


def cases():
    """(input, op, magnitude, negate, resample) tuples."""
    out = []

    def add(inp, op, mags, signs=(False,), resample="bicubic"):
        for m in mags:
            for negate in signs:
                out.append((inp, op, m, negate, resample))

    both = (False, True)
    # Every op over the magnitude range on the small synthetic image.
    for op in UNSIGNED:
        add("synthetic", op, (0, 3.7, 9, 10))
    for op in sorted(SIGNED):
        add("synthetic", op, (0, 3.7, 10), both)
    add("synthetic", "Rotate", (9,), both, "bilinear")
    # A photo at the magnitudes BEiT uses.
    for op in ("AutoContrast", "Equalize", "Invert"):
        add("chelsea", op, (9,))
    for op in ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "Posterize", "Solarize"):
        add("chelsea", op, (5, 9))
    for op in ("Color", "Contrast", "Brightness", "Sharpness"):
        add("chelsea", op, (3,))
        add("chelsea", op + "Increasing", (9,), both)
    add("chelsea", "Rotate", (5,))
    for op in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        add("chelsea", op, (9,), both)
    for op in ("TranslateX", "TranslateY"):
        add("chelsea", op, (9,))
    add("chelsea", "Rotate", (9,), (False,), "bilinear")
    add("chelsea", "ShearX", (9,), (True,), "bilinear")
    # Images smaller than the filter kernel.
    for op in ("SharpnessIncreasing", "Rotate", "ShearY", "Equalize", "AutoContrast"):
        add("tiny", op, (9,), both if op in SIGNED else (False,))
    # Quarter turns (magnitude 30 = 90 degrees): Pillow transposes square
    # images and rotates 180 degrees of any size by transposing.
    add("square", "Rotate", (30, 60), both)
    add("synthetic", "Rotate", (30, 60), both)
    return out


def legacy_posterize(img, bits):
    mask = ~(2 ** (8 - bits) - 1)
    return img.point([i & mask for i in range(256)] * 3)


def run_op(img, name, magnitude, negate, resample):
    """What timm's AugmentOp does after sampling the magnitude (no clipping,
    so that magnitudes above 10 reach the quarter-turn paths of rotate)."""
    hparams = dict(translate_const=TRANSLATE_CONST, img_mean=FILL)
    aa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
    level_fn = aa.LEVEL_TO_ARG[name]
    args = level_fn(magnitude, hparams) if level_fn is not None else ()
    if name in ("Posterize", "PosterizeIncreasing") and args[0] < 1:
        return legacy_posterize(img, args[0])
    return aa.NAME_TO_OP[name](img, *args, fillcolor=FILL, resample=RESAMPLE[resample])


def main():
    chelsea, images = inputs()
    tensors = {f"input/{k}": np.asarray(v) for k, v in images.items()}
    for inp, op, m, negate, resample in cases():
        sign = "-" if negate else "+"
        out = run_op(images[inp], op, m, negate, resample)
        tensors[f"op/{inp}/{op}/{m}/{sign}/{resample}"] = np.asarray(out)
    for (top, left, h, w), size in [
        ((37, 81, 201, 173), (56, 64)),
        ((10, 300, 30, 40), (48, 64)),
        ((0, 0, 300, 451), (40, 40)),
    ]:
        out = TF.resized_crop(chelsea, top, left, h, w, list(size), TF.InterpolationMode.BICUBIC)
        tensors[f"rrc/{top}_{left}_{h}_{w}/{size[0]}x{size[1]}"] = np.asarray(out)
    tensors = {k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in tensors.items()}
    # One metadata entry: safetensors writes a map of several in hash order,
    # which would make the file differ from run to run.
    info = {
        "fill": list(FILL),
        "translate_const": TRANSLATE_CONST,
        "img_mean_default": [min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN],
        "img_mean_inception": [min(255, round(255 * x)) for x in IMAGENET_INCEPTION_MEAN],
        "versions": {
            "pillow": PIL.__version__,
            "timm": timm.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
        },
    }
    metadata = {"info": json.dumps(info, sort_keys=True)}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"{len(tensors)} tensors, {os.path.getsize(OUT)} bytes -> {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
