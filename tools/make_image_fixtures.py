#!/usr/bin/env python3
"""Generate the image fixtures for `tests/preprocess.rs`.

Run from the repository root with a Python that has Pillow, numpy,
scikit-image, safetensors, torch and torchvision:

    /work/pyenv/bin/python tools/make_image_fixtures.py

Outputs (deterministic for given library versions, which are recorded in the
safetensors metadata):

* ``assets/photos/{chelsea,coffee,astronaut,rocket}.png`` + ``LICENSE.md``:
  scikit-image sample photos (rocket re-encoded from its JPEG to PNG).
* ``tests/fixtures/images/*``: small synthetic images in every supported
  format and mode, plus broken files the decoder must refuse.
* ``tests/fixtures/images/expected.safetensors``: what Pillow / torchvision
  make of them (the reference the Rust code must reproduce).
"""

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import PIL
import skimage
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "assets", "photos")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "images")
SKIMAGE_DATA = os.path.join(os.path.dirname(skimage.__file__), "data")

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC

# Pillow's decompression-bomb error threshold is 2 * 89_478_485 pixels.
BOMB_SIZE = (20000, 10000)

LICENSE_MD = """\
# Sample photographs

These four photographs are copied from the sample data bundled with
scikit-image {skimage_version} (`skimage/data/` in the wheel) by
`tools/make_image_fixtures.py`. `rocket.png` is a lossless PNG re-encoding
(via Pillow) of scikit-image's `rocket.jpg`; the other three are byte-for-byte
copies. The provenance and licence statements below are quoted from the
docstrings of `skimage.data.chelsea`, `coffee`, `astronaut` and `rocket`
(`skimage/data/_fetchers.py`):

| file | subject | size (w x h) | licence as stated by scikit-image |
|---|---|---|---|
| chelsea.png | Chelsea the cat | 451 x 300 | "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)." |
| coffee.png | Coffee cup, "courtesy of Pikolo Espresso Bar" | 600 x 400 | "No copyright restrictions. CC0 by the photographer (Rachel Michetti)." |
| astronaut.png | Astronaut Eileen Collins, "downloaded from the NASA Great Images database <https://flic.kr/p/r9qvLn>" | 512 x 512 | "No known copyright restrictions, released into the public domain." |
| rocket.png | Launch photo of DSCOVR on Falcon 9 by SpaceX, "downloaded from SpaceX Photos <https://www.flickr.com/photos/spacexphotos/16511594820/in/photostream/>" | 640 x 427 | "The image was captured by SpaceX and released in the public domain <http://arstechnica.com/tech-policy/2015/03/elon-musk-puts-spacex-photos-into-the-public-domain/>." |

They are used as realistic inputs for the preprocessing tests and examples.
"""


def copy_photos():
    """Copy the sample photos into assets/photos; return them as PIL images."""
    os.makedirs(PHOTOS, exist_ok=True)
    for name in ("chelsea", "coffee", "astronaut"):
        shutil.copyfile(
            os.path.join(SKIMAGE_DATA, name + ".png"), os.path.join(PHOTOS, name + ".png")
        )
    Image.open(os.path.join(SKIMAGE_DATA, "rocket.jpg")).convert("RGB").save(
        os.path.join(PHOTOS, "rocket.png"), optimize=True
    )
    with open(os.path.join(PHOTOS, "LICENSE.md"), "w") as f:
        f.write(LICENSE_MD.format(skimage_version=skimage.__version__))
    return {
        name: Image.open(os.path.join(PHOTOS, name + ".png")).convert("RGB")
        for name in ("chelsea", "coffee", "astronaut", "rocket")
    }


def png_chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def raw_png(width, height, bit_depth, color_type, rows, extra=b""):
    """A minimal PNG (filter type 0 on every row); `rows` are raw scanlines,
    `extra` are encoded chunks to put between IHDR and IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def rgb16_png(pixels):
    """16-bit RGB PNG; Pillow can read but not write these."""
    height, width, _ = pixels.shape
    rows = [pixels[y].astype(">u2").tobytes() for y in range(height)]
    return raw_png(width, height, 16, 2, rows)


def grey16_trns_png(pixels, key):
    """16-bit grey PNG with a tRNS colour key (Pillow still opens it as I;16)."""
    height, width = pixels.shape
    rows = [pixels[y].astype(">u2").tobytes() for y in range(height)]
    trns = png_chunk(b"tRNS", struct.pack(">H", key))
    return raw_png(width, height, 16, 0, rows, extra=trns)


def bomb_png():
    """Tiny PNG whose header claims 200 M pixels, over Pillow's error limit.

    Only the first scanline is present in IDAT, so the file is small and
    would be truncated if anything tried to decode it.
    """
    width, height = BOMB_SIZE
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def synthetic_images(rng, photo):
    """Encoded test images: {file name: bytes}."""
    h, w = 19, 27
    yy, xx = np.mgrid[0:h, 0:w]
    noise = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    grad = ((xx * 9 + yy * 5) % 256).astype(np.uint8)
    rgb = np.dstack([grad, noise[..., 0], 255 - grad])
    alpha = noise[..., 3].copy()
    alpha[0, :] = 0  # fully transparent row: its colour must survive
    rgba = np.dstack([rgb, alpha])

    def save(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    palette_img = Image.fromarray(rgb).quantize(colors=37, method=Image.Quantize.MEDIANCUT)
    trns_img = palette_img.copy()
    trns_img.info["transparency"] = 3
    frames = [palette_img, Image.fromarray(255 - rgb).quantize(colors=16)]
    grey16 = (xx * 2459 + yy * 311).astype(np.uint16)  # spans 0..~70k mod 2^16
    rgb16 = np.dstack([grey16, grey16[::-1], rng.integers(0, 65536, (h, w))]).astype(np.uint16)
    jpeg_src = photo.crop((100, 60, 228, 156))  # 128 x 96, real texture

    files = {
        "mode_1.png": save(Image.fromarray(grad > 120), "PNG"),
        "l.png": save(Image.fromarray(grad), "PNG"),
        "la.png": save(Image.fromarray(np.dstack([grad, alpha]), "LA"), "PNG"),
        "p.png": save(palette_img, "PNG"),
        "p_trns.png": save(trns_img, "PNG", transparency=3),
        "p4.png": save(Image.fromarray(rgb).quantize(colors=12), "PNG", bits=4),
        "rgb.png": save(Image.fromarray(rgb), "PNG"),
        "rgba.png": save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "grey16.png": save(Image.fromarray(grey16), "PNG"),
        "grey16_trns.png": grey16_trns_png(grey16, int(grey16[1, 1])),
        "rgb16.png": rgb16_png(rgb16),
        "anim.gif": save(
            frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=5, loop=0
        ),
        "rgb.bmp": save(Image.fromarray(rgb), "BMP"),
        "p.bmp": save(palette_img, "BMP"),
        "rgb.tif": save(Image.fromarray(rgb), "TIFF"),
        "rgba_lzw.tif": save(Image.fromarray(rgba, "RGBA"), "TIFF", compression="tiff_lzw"),
        "grey16.tif": save(Image.fromarray(grey16), "TIFF"),
        "lossless.webp": save(Image.fromarray(rgb), "WEBP", lossless=True),
        "rgba_lossless.webp": save(
            Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True
        ),
        "photo.jpg": save(jpeg_src, "JPEG", quality=90),
        "photo444.jpg": save(jpeg_src, "JPEG", quality=95, subsampling=0),
        "grey.jpg": save(jpeg_src.convert("L"), "JPEG", quality=90),
    }
    rgb_png = files["rgb.png"]
    bad = {
        "truncated.png": rgb_png[: len(rgb_png) // 2],
        "empty.png": b"",
        "not_an_image.jpg": b"This is a text file pretending to be a JPEG.\n",
        "bomb.png": bomb_png(),
    }
    return files, bad


def pillow_rgb(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def expected_tensors(files, photos):
    out = {}
    for name, data in files.items():
        out[f"decode/{name}"] = pillow_rgb(data)
    # Short side 256 (UNILM, crop_pct 0.875) for every photo; 248 (timm
    # beitv2 base, crop_pct 0.9) only for the two with awkward aspect ratios,
    # to keep the fixtures near 2.5 MB.
    for name, img in photos.items():
        sizes = (256, 248) if name in ("chelsea", "rocket") else (256,)
        for size in sizes:
            out[f"resize{size}/{name}"] = np.asarray(TF.resize(img, size, BICUBIC))

    chelsea = photos["chelsea"]
    # Upscale: a 45 x 37 patch to short side 64 (77 x 64).
    out["upscale64/chelsea_patch"] = np.asarray(
        TF.resize(chelsea.crop((200, 100, 245, 137)), 64, BICUBIC)
    )
    # Non-uniform aspect: shrink x by 7.4, stretch y by 1.48 at once.
    out["resize61x443/chelsea"] = np.asarray(chelsea.resize((61, 443), Image.BICUBIC))

    eval_transform = T.Compose(
        [
            T.Resize(256, interpolation=BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )
    out["eval224/chelsea"] = eval_transform(chelsea).numpy().astype(np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def main():
    rng = np.random.default_rng(20240229)
    photos = copy_photos()
    files, bad = synthetic_images(rng, photos["chelsea"])
    os.makedirs(FIXTURES, exist_ok=True)
    for name, data in {**files, **bad}.items():
        with open(os.path.join(FIXTURES, name), "wb") as f:
            f.write(data)

    for name, data in bad.items():
        try:
            pillow_rgb(data)
        except Exception as e:  # noqa: BLE001 - any failure is the point
            print(f"Pillow refuses {name}: {type(e).__name__}")
        else:
            raise SystemExit(f"Pillow unexpectedly decodes {name}")

    # One metadata entry: safetensors writes several in random order.
    versions = {
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    metadata = {"generated_with": json.dumps(versions, sort_keys=True)}
    expected_path = os.path.join(FIXTURES, "expected.safetensors")
    save_file(expected_tensors(files, photos), expected_path, metadata=metadata)
    os.chmod(expected_path, 0o644)
    total = sum(
        os.path.getsize(os.path.join(FIXTURES, n)) for n in os.listdir(FIXTURES)
    )
    print(f"wrote {len(files) + len(bad)} images + expected.safetensors ({total} bytes) to {FIXTURES}")


if __name__ == "__main__":
    main()
