#!/usr/bin/env python3
"""Writes the PyTorch checkpoint fixtures used by tests/torch_reader.rs.

Usage: python tools/make_pth_fixtures.py [OUT_DIR]   (default tests/fixtures/pth)

Needs torch, numpy and safetensors. The output is deterministic (seeded data,
fixed zip timestamps), so re-running it only changes files when the torch
serialisation format itself changes.

Files written:
  state_dict.pth     OrderedDict state dict of a small module plus tensors of
                     every dtype, a 0-d tensor, an empty tensor, a transposed
                     view and slices sharing storage with other entries.
  nested.pth         {'model': ..., 'epoch': 3, 'args': argparse.Namespace, ...}
                     with numpy scalars, a big int, bytes, a tuple and a
                     parameter carrying a Python attribute.
  mmengine.pth       {'state_dict': ..., 'meta': {...}}.
  protocol4.pth      {'model': ..., 'step': 10**12} with pickle_protocol=4.
  parameter.pth      a bare nn.Parameter.
  big_endian.pth     state dict rewritten as a big-endian machine saves it.
  renamed.pth        nested.pth with its top folder renamed to 'archive' and
                     every record deflate-compressed.
  legacy.pth         _use_new_zipfile_serialization=False (must be refused).
  malicious.pth      a torch-style zip whose data.pkl calls os.system.
  module.pth         a pickled nn.Linear (code, not data: must be refused).
  torchscript.pt     a torch.jit.save archive (must be refused).
  truncated.pth      the first half of state_dict.pth.
  hostile_*.pth      one float32 tensor of 10 elements with its pickle or storage altered:
                     past_end (size 1,000,000), offset_past (offset 5), overflow (size
                     (2^31-1)^3), short_storage (8 bytes of storage), negative_stride
                     (stride -1); hostile_stack.pth is 1,000,000 empty lists, then APPENDs.
  expected.safetensors  every tensor above, contiguous, keyed
                     '<file stem>/<dotted name>'.
"""

import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import struct
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file

ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def state_dict():
    """A module's state dict (which carries `_metadata`) plus odd tensors."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.BatchNorm1d(3)
    )
    sd = module.state_dict()  # includes an int64 `num_batches_tracked` buffer
    assert hasattr(sd, "_metadata")

    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    sd["dtype.f32"] = torch.tensor([1.5, -0.0, float("inf"), -2.25e-38, 3.4e38])
    sd["dtype.f16"] = torch.randn(2, 3, generator=g).to(torch.float16)
    sd["dtype.bf16"] = torch.randn(3, 2, generator=g).to(torch.bfloat16)
    sd["dtype.f64"] = torch.randn(2, 2, generator=g, dtype=torch.float64)
    sd["dtype.i64"] = torch.tensor([0, -1, 2**62, -(2**63), 2**63 - 1])
    sd["dtype.i32"] = torch.tensor([[7, -8], [2**31 - 1, -(2**31)]], dtype=torch.int32)
    sd["dtype.i16"] = torch.tensor([-32768, 32767, 5], dtype=torch.int16)
    sd["dtype.i8"] = torch.tensor([-128, 127, 0], dtype=torch.int8)
    sd["dtype.u8"] = torch.tensor([0, 255, 17], dtype=torch.uint8)
    sd["dtype.u16"] = torch.tensor([0, 65535, 300], dtype=torch.uint16)
    sd["dtype.bool"] = torch.tensor([True, False, True, True])
    sd["shape.scalar"] = torch.tensor(2.5)
    sd["shape.empty"] = torch.zeros(0, 3)
    sd["view.base"] = base
    sd["view.transposed"] = base.t()  # non-contiguous, shares base's storage
    sd["view.rows"] = base[1:3]  # storage offset 6
    sd["view.strided"] = base[1:, ::2]  # offset and non-unit strides
    sd["view.column"] = base[:, 5]  # 1-d with stride 6
    sd["view.expanded"] = torch.randn(1, 3, generator=g).expand(4, 3)  # stride 0
    return sd


def small_state_dict():
    torch.manual_seed(2)
    return torch.nn.Linear(3, 2).state_dict()


def tagged_parameter():
    """A parameter with a Python attribute: pickled through
    torch._utils._rebuild_parameter_with_state."""
    torch.manual_seed(6)
    p = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    p.tag = "frozen"
    return p


def save_torchscript(pt):
    """A scripted nn.Linear. Scripting orders class attributes by string hash
    and stamps a random serialization id, so it runs in a child process with
    a fixed hash seed and the id is then zeroed."""
    code = (
        "import sys, warnings, torch; warnings.simplefilter('ignore'); torch.manual_seed(7); "
        "torch.jit.script(torch.nn.Linear(2, 2)).save(sys.argv[1])"
    )
    tmp = pt + ".tmp"
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run([sys.executable, "-c", code, tmp], env=env, check=True)
    zero_id = lambda rest, data: b"0" * len(data) if rest == ".data/serialization_id" else data
    rewrite_zip(tmp, pt, rename="torchscript", transform=zero_id)
    os.remove(tmp)


def rewrite_zip(src, dst, rename=None, compress=zipfile.ZIP_STORED, transform=None):
    """Copies a torch zip, optionally renaming its top folder, compressing the
    records and transforming record contents (transform(name, data) -> data)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            folder, rest = info.filename.split("/", 1)
            if transform:
                data = transform(rest, data)
            name = f"{rename or folder}/{rest}"
            out = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            out.compress_type = compress
            zout.writestr(out, data)


def byteswap_records(dtypes):
    """transform() for rewrite_zip: makes records and byteorder big-endian."""

    def transform(rest, data):
        if rest == "byteorder":
            return b"big"
        if rest.startswith("data/"):
            dtype = dtypes[rest[len("data/") :]]
            return np.frombuffer(data, dtype=dtype).byteswap().tobytes()
        return data

    return transform


def storage_dtypes(pth):
    """Storage key -> numpy little-endian dtype, read from the persistent ids
    in a torch zip's data.pkl without rebuilding anything."""
    np_dtype = {
        "FloatStorage": "<f4",
        "HalfStorage": "<f2",
        "DoubleStorage": "<f8",
        "LongStorage": "<i8",
        "IntStorage": "<i4",
    }
    dtypes = {}

    class Scan(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch" and name.endswith("Storage"):
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch._utils":
                return lambda *args: None
            raise pickle.UnpicklingError(f"unexpected {module}.{name}")

        def persistent_load(self, pid):
            _, storage_class, key, _, _ = pid
            dtypes[key] = np_dtype[storage_class]

    with zipfile.ZipFile(pth) as z:
        (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        Scan(io.BytesIO(z.read(pkl))).load()
    return dtypes


def make_legacy_deterministic(pth):
    """The legacy format names storages by memory address; renames them to
    zero-padded counters of the same length so the file is reproducible."""
    with open(pth, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, sys info
        pickle.load(stream)

    class Skip(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            return lambda *args: None

        def persistent_load(self, pid):
            return None

    Skip(stream).load()
    keys = pickle.load(stream)
    for i, key in enumerate(keys):
        data = data.replace(key.encode(), str(i).zfill(len(key)).encode())
    with open(pth, "wb") as f:
        f.write(data)


def hostile(path):
    """Checkpoints whose tensors lie about their storage, and a pickle whose stack grows without
    bound: the reader must refuse each with an error, within a bounded memory."""
    small = path("hostile_base.pth")
    torch.save({"w": torch.arange(10, dtype=torch.float32)}, small)
    with zipfile.ZipFile(small) as z:
        records = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    os.remove(small)
    int32 = lambda v: b"J" + struct.pack("<i", v)
    shape10 = b"K\x00K\n\x85q\x08K\x01\x85q\t"  # offset 0, size (10,), stride (1,)
    variants = {
        "past_end": (shape10, b"K\x00" + int32(1_000_000) + b"\x85q\x08K\x01\x85q\t", None),
        "offset_past": (shape10, b"K\x05K\n\x85q\x08K\x01\x85q\t", None),
        "overflow": (shape10, b"K\x00" + int32(2**31 - 1) * 3 + b"\x87q\x08K\x01K\x01K\x01\x87q\t",
                     None),
        "short_storage": (shape10, shape10, 8),
        "negative_stride": (shape10, b"K\x00K\n\x85q\x08" + int32(-1) + b"\x85q\t", None),
    }
    for name, (old, new, storage_len) in variants.items():
        stem = f"hostile_{name}"
        with zipfile.ZipFile(path(stem + ".pth"), "w", zipfile.ZIP_STORED) as z:
            for rec, data in records.items():
                if rec == "data.pkl":
                    assert old in data, "torch changed its pickle layout"
                    data = data.replace(old, new)
                if rec == "data/0" and storage_len is not None:
                    data = data[:storage_len]
                z.writestr(zipfile.ZipInfo(f"{stem}/{rec}", date_time=ZIP_DATE), data)
    n = 1_000_000
    stack = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    with zipfile.ZipFile(path("hostile_stack.pth"), "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in [("hostile_stack/data.pkl", stack), ("hostile_stack/version", b"3\n")]:
            z.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), data,
                       compress_type=zipfile.ZIP_DEFLATED)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("tests", "fixtures", "pth")
    os.makedirs(out, exist_ok=True)
    path = lambda name: os.path.join(out, name)
    expected = {}

    def record(stem, tensors):
        for name, t in tensors.items():
            expected[f"{stem}/{name}"] = t.detach().clone().contiguous()

    # Plain state dict.
    sd = state_dict()
    torch.save(sd, path("state_dict.pth"))
    record("state_dict", sd)

    # unilm/DeiT-style training checkpoint.
    model = small_state_dict()
    nested = {
        "model": model,
        "epoch": 3,
        "args": argparse.Namespace(lr=0.1, name="x", layers=[1, 2], flag=True, none=None),
        "np_metric": np.float64(0.25),
        "np_int": np.int64(-7),
        "np_f32": np.float32(1.5),
        "big": 2**70,
        "bytes": b"ab\x00\xff",
        "tuple": (1, "a", 2.5),
        "tagged_param": tagged_parameter(),
    }
    torch.save(nested, path("nested.pth"))
    record("nested", {f"model.{k}": v for k, v in model.items()})
    record("nested", {"tagged_param": nested["tagged_param"]})

    # mmengine / mmpretrain style.
    mm = {
        "meta": {"epoch": 12, "mmengine_version": "0.10.4", "dataset_meta": {"classes": ("cat", "dog")}},
        "state_dict": model,
    }
    torch.save(mm, path("mmengine.pth"))
    record("mmengine", {f"state_dict.{k}": v for k, v in model.items()})

    # Pickle protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE).
    torch.save({"model": model, "step": 10**12}, path("protocol4.pth"), pickle_protocol=4)
    record("protocol4", {f"model.{k}": v for k, v in model.items()})

    # A bare parameter.
    torch.manual_seed(3)
    param = torch.nn.Parameter(torch.randn(2, 3))
    torch.save(param, path("parameter.pth"))
    expected["parameter/"] = param.detach().clone()

    # Big-endian: what torch.save writes on a big-endian machine.
    torch.manual_seed(4)
    be = collections.OrderedDict(
        f32=torch.randn(2, 3),
        f16=torch.randn(3).half(),
        f64=torch.randn(2).double(),
        i64=torch.tensor([1, -2, 2**40]),
        i32=torch.tensor([3, -4], dtype=torch.int32),
    )
    be["f32_t"] = be["f32"].t()
    torch.save(be, path("little.tmp"))
    rewrite_zip(path("little.tmp"), path("big_endian.pth"), rename="big_endian",
                transform=byteswap_records(storage_dtypes(path("little.tmp"))))
    os.remove(path("little.tmp"))
    reloaded = torch.load(path("big_endian.pth"))
    for k, v in be.items():
        assert torch.equal(reloaded[k], v), k
    record("big_endian", be)

    # Other folder name and compressed records.
    rewrite_zip(path("nested.pth"), path("renamed.pth"), rename="archive",
                compress=zipfile.ZIP_DEFLATED)
    record("renamed", {f"model.{k}": v for k, v in model.items()})
    record("renamed", {"tagged_param": nested["tagged_param"]})

    # Refusals.
    torch.save(model, path("legacy.pth"), _use_new_zipfile_serialization=False)
    make_legacy_deterministic(path("legacy.pth"))
    with zipfile.ZipFile(path("malicious.pth"), "w") as z:
        payload = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02."
        for name, data in [("malicious/data.pkl", payload), ("malicious/byteorder", b"little"),
                           ("malicious/version", b"3\n")]:
            z.writestr(zipfile.ZipInfo(name, date_time=ZIP_DATE), data)
    torch.manual_seed(5)
    torch.save(torch.nn.Linear(2, 2), path("module.pth"))
    save_torchscript(path("torchscript.pt"))
    with open(path("state_dict.pth"), "rb") as f:
        data = f.read()
    with open(path("truncated.pth"), "wb") as f:
        f.write(data[: len(data) // 2])

    save_file(expected, path("expected.safetensors"))
    hostile(path)
    total = sum(os.path.getsize(path(n)) for n in os.listdir(out))
    print(f"wrote {len(os.listdir(out))} files, {total} bytes, {len(expected)} expected tensors")


if __name__ == "__main__":
    main()
