//! PyTorch zip checkpoints (`torch.save`, PyTorch ≥ 1.6), read as data.
//!
//! A checkpoint is a zip archive whose single top folder (named after the file
//! stem, `archive`, or anything else) holds `data.pkl`, the pickled object
//! tree, `data/<key>`, one raw record per storage, and `byteorder`. The pickle
//! is decoded by [`super::pickle`] without executing anything; each tensor is
//! then read from its storage record — honouring storage offsets and strides,
//! so views, transposes and storages shared between tensors come out right —
//! into a CPU `candle_core::Tensor`.
//!
//! The file is memory-mapped and stored (uncompressed) records are read in
//! place: each tensor's elements are copied once, from the page cache into
//! the tensor, and storages are never copied whole.
//!
//! Element types: `float32`, `float64`, `float16`, `bfloat16`, `int64`,
//! `uint8` and `uint32` keep their type. Types candle has no good support for
//! are widened losslessly: `int32`, `int16` and `int8` become `I64`,
//! `uint16` becomes `U32`, and `bool` becomes `U8` holding 0 or 1.
//!
//! The legacy non-zip format of PyTorch < 1.6 and TorchScript archives are
//! refused with an explanation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use zip::{CompressionMethod, ZipArchive};

use super::pickle::{self, PickleError, TensorRef, TorchDtype, Value};

/// A checkpoint's object tree with its tensors read into memory.
pub type TorchValue = Value<Tensor>;

/// Keys under which training frameworks nest the state dict, in the order
/// [`find_state_dict`] tries them: mmengine/Lightning (`state_dict`),
/// unilm/DeiT (`model`), DeepSpeed-style wrappers (`module`).
pub const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model", "module"];

/// How torch < 1.6 began its files: a protocol-2 pickle of the integer
/// 0x1950a86a20f9469cfc6c (`LONG1`, 10 bytes, little-endian).
const LEGACY_MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Reads a `torch.save` file (`.pth`, `.pt`, `.bin`, ...) into a value tree
/// whose tensors live on the CPU.
///
/// Errors name the file and, where relevant, the archive record; a pickle
/// that refers to anything but known data types (e.g. `os.system`, or a
/// pickled `nn.Module`) is refused rather than run.
pub fn read_torch_file(path: &Path) -> Result<TorchValue> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the map is read-only and dropped before returning; as with any
    // file mapping, another process truncating the file meanwhile would
    // fault, which is the accepted trade-off for not copying gigabytes.
    let map = unsafe { Mmap::map(&file) }
        .with_context(|| format!("cannot map {} into memory", path.display()))?;
    let bytes: &[u8] = &map;
    if !bytes.starts_with(b"PK") {
        if bytes[..bytes.len().min(32)]
            .windows(LEGACY_MAGIC.len())
            .any(|w| w == LEGACY_MAGIC)
        {
            bail!(
                "{} uses the legacy torch.save format of PyTorch < 1.6, which is not \
                 supported: re-save it with a recent PyTorch, e.g. \
                 torch.save(torch.load(path), path)",
                path.display()
            );
        }
        bail!(
            "{} is not a PyTorch checkpoint: expected a zip archive as written by torch.save",
            path.display()
        );
    }
    Archive::open(path, bytes)?.read()
}

/// Every tensor reachable through dicts, lists and tuples, named by its dotted
/// path (`blocks.0.attn.qkv.weight`; list elements by index, integer dict
/// keys in decimal). Other leaves (numbers, strings, namespaces) are skipped.
/// A tensor at the root is named `""`.
pub fn tensors_with_prefix(v: &TorchValue) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    flatten(v, "", &mut out);
    out
}

fn flatten(v: &TorchValue, prefix: &str, out: &mut Vec<(String, Tensor)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match v {
        Value::Tensor(t) => out.push((prefix.to_owned(), t.clone())),
        Value::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                flatten(v, &join(&key), out);
            }
        }
        Value::List(items) | Value::Tuple(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(v, &join(&i.to_string()), out);
            }
        }
        _ => {}
    }
}

/// The state dict of a checkpoint: the value of the first of
/// [`STATE_DICT_KEYS`] that holds a dict, with that key, or the checkpoint
/// itself (with `None`) when it is not such a wrapper.
pub fn find_state_dict(v: &TorchValue) -> (Option<&'static str>, &TorchValue) {
    STATE_DICT_KEYS
        .iter()
        .find_map(|&key| {
            v.get(key)
                .filter(|inner| inner.as_dict().is_some())
                .map(|inner| (Some(key), inner))
        })
        .unwrap_or((None, v))
}

/// An opened checkpoint archive.
struct Archive<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    zip: ZipArchive<Cursor<&'a [u8]>>,
    /// The top folder with its trailing `/` (empty if the records are at the
    /// root).
    prefix: String,
    big_endian: bool,
}

impl<'a> Archive<'a> {
    fn open(path: &'a Path, bytes: &'a [u8]) -> Result<Self> {
        let zip = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
            anyhow!(
                "{} is not a readable zip archive (truncated or corrupt?): {e}",
                path.display()
            )
        })?;
        // Names that are not UTF-8 cannot be torch records; skip them.
        let names: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok().map(Cow::into_owned))
            .collect();
        let pickles: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| {
                n.strip_suffix("data.pkl")
                    .is_some_and(|dir| dir.is_empty() || dir.find('/') == Some(dir.len() - 1))
            })
            .collect();
        let prefix = match pickles.as_slice() {
            [one] => one.trim_end_matches("data.pkl").to_owned(),
            [] => bail!(
                "{} is a zip archive without a data.pkl record: not written by torch.save",
                path.display()
            ),
            several => bail!(
                "{} holds several data.pkl records ({}): not a single torch.save checkpoint",
                path.display(),
                several.join(", ")
            ),
        };
        if names.iter().any(|n| {
            *n == format!("{prefix}constants.pkl") || n.starts_with(&format!("{prefix}code/"))
        }) {
            bail!(
                "{} is a TorchScript archive (torch.jit.save), which holds code: save the \
                 model's state_dict() with torch.save instead",
                path.display()
            );
        }
        let mut archive = Self {
            path,
            bytes,
            zip,
            prefix,
            big_endian: false,
        };
        archive.big_endian = archive.read_byteorder()?;
        Ok(archive)
    }

    /// Whether storages are big-endian, from the optional `byteorder` record
    /// (absent in files from torch < 1.10, which were all little-endian).
    fn read_byteorder(&mut self) -> Result<bool> {
        let name = format!("{}byteorder", self.prefix);
        if self.zip.index_for_name(&name).is_none() {
            return Ok(false);
        }
        let record = self.record("byteorder")?;
        match record.as_ref() {
            b"little" => Ok(false),
            b"big" => Ok(true),
            other => bail!(
                "{}: record {name} says {:?}, expected \"little\" or \"big\"",
                self.path.display(),
                String::from_utf8_lossy(other)
            ),
        }
    }

    /// The bytes of record `<prefix><name>`: borrowed from the map when
    /// stored, inflated otherwise (torch never compresses, other zip tools
    /// might).
    fn record(&mut self, name: &str) -> Result<Cow<'a, [u8]>> {
        let full = format!("{}{name}", self.prefix);
        let path = self.path;
        let fail = |what: String| anyhow!("{}: record {full}: {what}", path.display());
        let mut entry = self.zip.by_name(&full).map_err(|e| fail(e.to_string()))?;
        let size = entry.size();
        if entry.compression() == CompressionMethod::Stored {
            let start = entry
                .data_start()
                .ok_or_else(|| fail("no data offset".into()))?;
            let range = usize::try_from(start)
                .ok()
                .zip(usize::try_from(size).ok())
                .and_then(|(start, size)| Some(start..start.checked_add(size)?))
                .filter(|range| range.end <= self.bytes.len())
                .ok_or_else(|| fail("extends past the end of the file (truncated?)".into()))?;
            return Ok(Cow::Borrowed(&self.bytes[range]));
        }
        let mut out = Vec::new();
        entry
            .by_ref()
            .take(size)
            .read_to_end(&mut out)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Cow::Owned(out))
    }

    fn read(mut self) -> Result<TorchValue> {
        let data_pkl = self.record("data.pkl")?;
        let tree = pickle::unpickle(&data_pkl).map_err(|e| match e {
            PickleError::Refused { module, name } => anyhow!(
                "refusing to load {module}.{name} from {}: not a known data type \
                 (checkpoints are read as data, never executed)",
                self.path.display()
            ),
            other => anyhow!(
                "{}: record {}data.pkl: {other}",
                self.path.display(),
                self.prefix
            ),
        })?;
        let mut storages: HashMap<String, Cow<'a, [u8]>> = HashMap::new();
        tree.try_map_tensors(&mut |t: TensorRef| {
            let key = &t.storage.key;
            if !storages.contains_key(key) {
                let record = self.record(&format!("data/{key}"))?;
                storages.insert(key.clone(), record);
            }
            let bytes = &storages[key];
            to_candle(&t, bytes, self.big_endian).map_err(|e| {
                anyhow!(
                    "{}: record {}data/{key}: {e:#}",
                    self.path.display(),
                    self.prefix
                )
            })
        })
    }
}

/// A validated strided view: every element index lies inside the storage.
struct View {
    offset: usize,
    numel: usize,
    /// Sizes and strides of the dimensions longer than 1 (the others never
    /// move the index).
    dims: Vec<(usize, usize)>,
    contiguous: bool,
}

impl View {
    fn new(t: &TensorRef, storage_len: usize) -> Result<Self> {
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| anyhow!("tensor size {:?} overflows", t.shape))?;
        let dims: Vec<(usize, usize)> = t
            .shape
            .iter()
            .copied()
            .zip(t.stride.iter().copied())
            .filter(|&(size, _)| size != 1)
            .collect();
        // With no dimension of size 0, this is the last element reached.
        let last = || {
            dims.iter().try_fold(t.offset, |end, &(size, stride)| {
                end.checked_add((size - 1).checked_mul(stride)?)
            })
        };
        if numel > 0 && last().is_none_or(|last| last >= storage_len) {
            bail!(
                "tensor (offset {}, size {:?}, stride {:?}) reaches past its storage of \
                 {storage_len} {} elements",
                t.offset,
                t.shape,
                t.stride,
                t.dtype.name()
            );
        }
        let mut expected = 1;
        let mut contiguous = true;
        for &(size, stride) in dims.iter().rev() {
            contiguous &= stride == expected;
            expected *= size;
        }
        Ok(Self {
            offset: t.offset,
            numel,
            dims,
            contiguous,
        })
    }

    /// Decodes the viewed elements in row-major order.
    fn gather<E: Element<N>, const N: usize>(&self, storage: &[[u8; N]], big: bool) -> Vec<E> {
        if self.numel == 0 {
            return Vec::new();
        }
        if self.contiguous {
            return storage[self.offset..self.offset + self.numel]
                .iter()
                .map(|&b| E::decode(b, big))
                .collect();
        }
        let mut out = Vec::with_capacity(self.numel);
        let mut index = vec![0usize; self.dims.len()];
        let mut pos = self.offset;
        for _ in 0..self.numel {
            out.push(E::decode(storage[pos], big));
            // Odometer increment, innermost dimension first. Every dimension
            // here is at least 2 long, so `pos` never strays further than one
            // stride past the validated range.
            for (i, &(size, stride)) in self.dims.iter().enumerate().rev() {
                index[i] += 1;
                pos += stride;
                if index[i] < size {
                    break;
                }
                pos -= stride * size;
                index[i] = 0;
            }
        }
        out
    }
}

/// A storage element type, decoded from `N` bytes.
trait Element<const N: usize> {
    fn decode(bytes: [u8; N], big_endian: bool) -> Self;
}

macro_rules! element {
    ($($t:ty => $n:literal),* $(,)?) => {$(
        impl Element<$n> for $t {
            fn decode(bytes: [u8; $n], big_endian: bool) -> Self {
                if big_endian {
                    <$t>::from_be_bytes(bytes)
                } else {
                    <$t>::from_le_bytes(bytes)
                }
            }
        }
    )*};
}

element!(f64 => 8, f32 => 4, f16 => 2, bf16 => 2, i64 => 8, i32 => 4, i16 => 2, i8 => 1,
    u8 => 1, u16 => 2, u32 => 4);

/// Decodes the elements of tensor `t` from its storage record.
fn decode<E: Element<N>, const N: usize>(t: &TensorRef, bytes: &[u8], big: bool) -> Result<Vec<E>> {
    let (storage, _) = bytes.as_chunks::<N>();
    Ok(View::new(t, storage.len())?.gather(storage, big))
}

/// Reads tensor `t` from its storage record into a CPU tensor, widening the
/// types candle lacks (see the module documentation).
fn to_candle(t: &TensorRef, bytes: &[u8], big: bool) -> Result<Tensor> {
    fn widen<A, B: From<A>>(values: Vec<A>) -> Vec<B> {
        values.into_iter().map(B::from).collect()
    }
    let shape = t.shape.clone();
    let cpu = &Device::Cpu;
    let tensor = match t.dtype {
        TorchDtype::F64 => Tensor::from_vec(decode::<f64, 8>(t, bytes, big)?, shape, cpu),
        TorchDtype::F32 => Tensor::from_vec(decode::<f32, 4>(t, bytes, big)?, shape, cpu),
        TorchDtype::F16 => Tensor::from_vec(decode::<f16, 2>(t, bytes, big)?, shape, cpu),
        TorchDtype::BF16 => Tensor::from_vec(decode::<bf16, 2>(t, bytes, big)?, shape, cpu),
        TorchDtype::I64 => Tensor::from_vec(decode::<i64, 8>(t, bytes, big)?, shape, cpu),
        TorchDtype::U8 => Tensor::from_vec(decode::<u8, 1>(t, bytes, big)?, shape, cpu),
        TorchDtype::U32 => Tensor::from_vec(decode::<u32, 4>(t, bytes, big)?, shape, cpu),
        TorchDtype::I32 => Tensor::from_vec(
            widen::<_, i64>(decode::<i32, 4>(t, bytes, big)?),
            shape,
            cpu,
        ),
        TorchDtype::I16 => Tensor::from_vec(
            widen::<_, i64>(decode::<i16, 2>(t, bytes, big)?),
            shape,
            cpu,
        ),
        TorchDtype::I8 => {
            Tensor::from_vec(widen::<_, i64>(decode::<i8, 1>(t, bytes, big)?), shape, cpu)
        }
        TorchDtype::U16 => Tensor::from_vec(
            widen::<_, u32>(decode::<u16, 2>(t, bytes, big)?),
            shape,
            cpu,
        ),
        TorchDtype::Bool => {
            let bytes: Vec<u8> = decode::<u8, 1>(t, bytes, big)?;
            let bits = bytes.into_iter().map(|b| u8::from(b != 0)).collect();
            Tensor::from_vec::<_, u8>(bits, shape, cpu)
        }
    };
    Ok(tensor?)
}
