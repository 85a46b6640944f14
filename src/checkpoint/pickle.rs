//! Data-only unpickler.
//!
//! PyTorch checkpoints (`torch.save`) are Python pickles: programs for a small
//! stack machine that may call any importable Python function. This module
//! runs that stack machine *as a decoder*: the opcodes that build containers
//! and scalars are interpreted, and the few Python callables a checkpoint
//! legitimately uses (`collections.OrderedDict`, torch's tensor rebuilders,
//! storage and dtype markers, `argparse.Namespace`, numpy scalars) are
//! recognised by name and turned into [`Value`]s. Any other global is refused
//! with [`PickleError::Refused`]; nothing is ever executed.
//!
//! Tensors come out as [`TensorRef`]s (storage key, dtype, offset, shape,
//! strides); reading their bytes is the job of [`super::torch`].
//!
//! Hostile input is expected: every length is checked against the remaining
//! input before anything is allocated, nesting depth is bounded (the tree is
//! dropped recursively), and copies made through the memo are charged to a
//! budget proportional to the input size, so a short pickle cannot expand into
//! an enormous tree.

use std::collections::HashMap;
use std::fmt;

/// Deepest container nesting accepted. Real checkpoints nest a handful of
/// levels; the bound keeps recursive drops and formatting off the stack limit.
const MAX_DEPTH: usize = 200;

/// Most values on the stack at once. Python's pickler batches containers in
/// groups of 1,000, so real files stay far below; the bound caps the reader's
/// memory at about `MAX_STACK × size_of::<Item>()` (tens of MB) whatever the
/// input's size.
const MAX_STACK: usize = 1 << 18;

/// Largest pickle protocol understood (Python 3.8+ writes at most 5).
const MAX_PROTOCOL: u8 = 5;

/// Why a pickle could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The stream ended before `STOP`.
    #[error("pickle data ends early at byte {offset} (truncated file?)")]
    Truncated {
        /// Offset at which more bytes were needed.
        offset: usize,
    },
    /// A global outside the allow-list; it would have been imported and run
    /// by Python's unpickler.
    #[error(
        "refusing to load {module}.{name}: not a known data type \
         (checkpoints are read as data, never executed)"
    )]
    Refused {
        /// Python module of the global, e.g. `os`.
        module: String,
        /// Attribute name of the global, e.g. `system`.
        name: String,
    },
    /// An opcode this reader does not implement (old text protocols, sets,
    /// out-of-band buffers).
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte {offset}")]
    UnsupportedOpcode {
        /// The opcode byte.
        opcode: u8,
        /// Its offset in the stream.
        offset: usize,
    },
    /// The stream is well-formed up to here but makes no sense (wrong operand
    /// types, stack underflow, bad arguments to a recognised constructor).
    #[error("malformed pickle at byte {offset}: {message}")]
    Malformed {
        /// Offset of the offending opcode.
        offset: usize,
        /// What was wrong.
        message: String,
    },
    /// Nesting or memo expansion beyond the reader's limits.
    #[error("pickle at byte {offset} exceeds the reader's limits: {message}")]
    TooLarge {
        /// Offset of the offending opcode.
        offset: usize,
        /// Which limit was hit.
        message: String,
    },
}

/// Element type of a torch storage or tensor, as named in the pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    /// `torch.float64`
    F64,
    /// `torch.float32`
    F32,
    /// `torch.float16`
    F16,
    /// `torch.bfloat16`
    BF16,
    /// `torch.int64`
    I64,
    /// `torch.int32`
    I32,
    /// `torch.int16`
    I16,
    /// `torch.int8`
    I8,
    /// `torch.uint8`
    U8,
    /// `torch.uint16` (torch ≥ 2.3, stored through `_rebuild_tensor_v3`)
    U16,
    /// `torch.uint32` (torch ≥ 2.3, stored through `_rebuild_tensor_v3`)
    U32,
    /// `torch.bool`, one byte per element
    Bool,
}

impl TorchDtype {
    /// torch's name for the dtype, e.g. `float32`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::U16 => "uint16",
            Self::U32 => "uint32",
            Self::Bool => "bool",
        }
    }

    /// The typed storage class torch pickles for this dtype
    /// (`torch.FloatStorage`, ...); the newer dtypes have none.
    pub fn storage_class(self) -> Option<&'static str> {
        Some(match self {
            Self::F64 => "DoubleStorage",
            Self::F32 => "FloatStorage",
            Self::F16 => "HalfStorage",
            Self::BF16 => "BFloat16Storage",
            Self::I64 => "LongStorage",
            Self::I32 => "IntStorage",
            Self::I16 => "ShortStorage",
            Self::I8 => "CharStorage",
            Self::U8 => "ByteStorage",
            Self::Bool => "BoolStorage",
            Self::U16 | Self::U32 => return None,
        })
    }

    const ALL: [Self; 12] = [
        Self::F64,
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::I64,
        Self::I32,
        Self::I16,
        Self::I8,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::Bool,
    ];

    fn from_storage_class(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.storage_class() == Some(name))
    }

    /// The dtype of a `torch.<name>` dtype global, as torch pickles them.
    fn from_torch_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// A Python global on the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`
    OrderedDict,
    /// `torch._utils._rebuild_tensor`
    RebuildTensor,
    /// `torch._utils._rebuild_tensor_v2`
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor_v3` (dtypes added in torch 2.x)
    RebuildTensorV3,
    /// `torch._utils._rebuild_parameter`
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`
    RebuildParameterWithState,
    /// A storage class: `torch.FloatStorage` and friends carry their dtype,
    /// `torch.storage.UntypedStorage` carries none.
    StorageClass(Option<TorchDtype>),
    /// A dtype such as `torch.float32`.
    Dtype(TorchDtype),
    /// `argparse.Namespace`
    Namespace,
    /// `numpy.core.multiarray.scalar` (or `numpy._core...` in numpy 2)
    NumpyScalar,
    /// `numpy.dtype`
    NumpyDtype,
    /// `numpy.core.multiarray._reconstruct` (or `numpy._core...`)
    NumpyReconstruct,
    /// `numpy.ndarray`
    NumpyNdarray,
    /// `_codecs.encode`, which protocol 2 uses to pickle `bytes`.
    CodecsEncode,
}

impl Global {
    /// Resolves `module.name` against the allow-list.
    fn resolve(module: &str, name: &str) -> Result<Self, PickleError> {
        let global = match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Self::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch.storage", "UntypedStorage") => Self::StorageClass(None),
            ("argparse", "Namespace") => Self::Namespace,
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Self::NumpyScalar,
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
                Self::NumpyReconstruct
            }
            ("numpy", "dtype") => Self::NumpyDtype,
            ("numpy", "ndarray") => Self::NumpyNdarray,
            ("_codecs", "encode") => Self::CodecsEncode,
            ("torch", _) => {
                if let Some(dtype) = TorchDtype::from_storage_class(name) {
                    Self::StorageClass(Some(dtype))
                } else if let Some(dtype) = TorchDtype::from_torch_name(name) {
                    Self::Dtype(dtype)
                } else {
                    return Err(refused(module, name));
                }
            }
            _ => return Err(refused(module, name)),
        };
        Ok(global)
    }
}

fn refused(module: &str, name: &str) -> PickleError {
    PickleError::Refused {
        module: module.to_owned(),
        name: name.to_owned(),
    }
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OrderedDict => f.write_str("collections.OrderedDict"),
            Self::RebuildTensor => f.write_str("torch._utils._rebuild_tensor"),
            Self::RebuildTensorV2 => f.write_str("torch._utils._rebuild_tensor_v2"),
            Self::RebuildTensorV3 => f.write_str("torch._utils._rebuild_tensor_v3"),
            Self::RebuildParameter => f.write_str("torch._utils._rebuild_parameter"),
            Self::RebuildParameterWithState => {
                f.write_str("torch._utils._rebuild_parameter_with_state")
            }
            Self::StorageClass(None) => f.write_str("torch.storage.UntypedStorage"),
            Self::StorageClass(Some(dtype)) => {
                write!(
                    f,
                    "torch.{}",
                    dtype.storage_class().unwrap_or("TypedStorage")
                )
            }
            Self::Dtype(dtype) => write!(f, "torch.{}", dtype.name()),
            Self::Namespace => f.write_str("argparse.Namespace"),
            Self::NumpyScalar => f.write_str("numpy.core.multiarray.scalar"),
            Self::NumpyDtype => f.write_str("numpy.dtype"),
            Self::NumpyReconstruct => f.write_str("numpy.core.multiarray._reconstruct"),
            Self::NumpyNdarray => f.write_str("numpy.ndarray"),
            Self::CodecsEncode => f.write_str("_codecs.encode"),
        }
    }
}

/// A storage referenced by a checkpoint's persistent id
/// `('storage', <class>, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Record name under `<archive>/data/`.
    pub key: String,
    /// Element type for typed storages; `None` for `UntypedStorage`.
    pub dtype: Option<TorchDtype>,
    /// Device the storage was saved from (`cpu`, `cuda:0`, ...).
    pub location: String,
    /// Elements (bytes for untyped storages) as declared in the pickle.
    pub numel: u64,
}

/// A tensor described by the pickle: a strided view into a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage holding the elements.
    pub storage: StorageRef,
    /// Element type of the tensor.
    pub dtype: TorchDtype,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// Size of each dimension; empty for a 0-d tensor.
    pub shape: Vec<usize>,
    /// Stride of each dimension, in elements.
    pub stride: Vec<usize>,
    /// Whether the tensor was saved with `requires_grad` (parameters).
    pub requires_grad: bool,
}

/// A decoded Python object.
///
/// `T` is the tensor representation: [`TensorRef`] straight out of the
/// unpickler, `candle_core::Tensor` once [`super::torch`] has read the data.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<T = TensorRef> {
    /// `None`
    None,
    /// `bool`
    Bool(bool),
    /// An `int` that fits in 64 bits.
    Int(i64),
    /// A larger `int`: little-endian two's complement bytes, as pickled.
    BigInt(Vec<u8>),
    /// `float`
    Float(f64),
    /// `str` (invalid UTF-8, e.g. lone surrogates, is replaced with U+FFFD)
    Str(String),
    /// `bytes` or `bytearray`
    Bytes(Vec<u8>),
    /// `tuple`
    Tuple(Vec<Value<T>>),
    /// `list`
    List(Vec<Value<T>>),
    /// `dict` or `OrderedDict`, in insertion order. Attributes set on an
    /// `OrderedDict` (such as a state dict's `_metadata`) are dropped.
    Dict(Vec<(Value<T>, Value<T>)>),
    /// An `argparse.Namespace`: attribute names and values, in order.
    Namespace(Vec<(String, Value<T>)>),
    /// A tensor or `nn.Parameter`.
    Tensor(T),
    /// A storage pickled on its own rather than through a tensor.
    Storage(StorageRef),
    /// A recognised global used as a value (e.g. a dtype saved in a config).
    Global(Global),
    /// An allow-listed object kept as data without interpretation (numpy
    /// arrays and dtypes, numpy scalars of unusual types): the constructor,
    /// its arguments and the state passed to `__setstate__`.
    Object {
        /// The constructor.
        class: Global,
        /// Its arguments.
        args: Vec<Value<T>>,
        /// State from a `BUILD` opcode, if any.
        state: Option<Box<Value<T>>>,
    },
}

impl<T> Value<T> {
    /// Short description of the variant for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Bool(_) => "bool",
            Self::Int(_) | Self::BigInt(_) => "int",
            Self::Float(_) => "float",
            Self::Str(_) => "str",
            Self::Bytes(_) => "bytes",
            Self::Tuple(_) => "tuple",
            Self::List(_) => "list",
            Self::Dict(_) => "dict",
            Self::Namespace(_) => "Namespace",
            Self::Tensor(_) => "tensor",
            Self::Storage(_) => "storage",
            Self::Global(_) => "global",
            Self::Object { .. } => "object",
        }
    }

    /// The entry for the string key `key` of a dict, or the attribute `key`
    /// of a namespace.
    pub fn get(&self, key: &str) -> Option<&Value<T>> {
        match self {
            Self::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            Self::Namespace(attrs) => attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The entries of a dict.
    pub fn as_dict(&self) -> Option<&[(Value<T>, Value<T>)]> {
        match self {
            Self::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// The elements of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value<T>]> {
        match self {
            Self::List(items) | Self::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The string, if this is a `str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an `int` that fits in 64 bits.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number, if this is a `float` or an `int` that fits in 64 bits.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Self::Float(x) => Some(*x),
            Self::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The boolean, if this is a `bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&T> {
        match self {
            Self::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// Rebuilds the tree with every tensor replaced by `f(tensor)`, stopping
    /// at the first error.
    pub fn try_map_tensors<U, E>(
        self,
        f: &mut impl FnMut(T) -> Result<U, E>,
    ) -> Result<Value<U>, E> {
        let seq = |items: Vec<Value<T>>, f: &mut _| {
            items
                .into_iter()
                .map(|v| v.try_map_tensors(f))
                .collect::<Result<Vec<_>, E>>()
        };
        Ok(match self {
            Self::None => Value::None,
            Self::Bool(b) => Value::Bool(b),
            Self::Int(i) => Value::Int(i),
            Self::BigInt(b) => Value::BigInt(b),
            Self::Float(x) => Value::Float(x),
            Self::Str(s) => Value::Str(s),
            Self::Bytes(b) => Value::Bytes(b),
            Self::Tuple(items) => Value::Tuple(seq(items, f)?),
            Self::List(items) => Value::List(seq(items, f)?),
            Self::Dict(items) => Value::Dict(
                items
                    .into_iter()
                    .map(|(k, v)| Ok((k.try_map_tensors(f)?, v.try_map_tensors(f)?)))
                    .collect::<Result<_, E>>()?,
            ),
            Self::Namespace(attrs) => Value::Namespace(
                attrs
                    .into_iter()
                    .map(|(k, v)| Ok((k, v.try_map_tensors(f)?)))
                    .collect::<Result<_, E>>()?,
            ),
            Self::Tensor(t) => Value::Tensor(f(t)?),
            Self::Storage(s) => Value::Storage(s),
            Self::Global(g) => Value::Global(g),
            Self::Object { class, args, state } => Value::Object {
                class,
                args: seq(args, f)?,
                state: match state {
                    Some(s) => Some(Box::new(s.try_map_tensors(f)?)),
                    None => None,
                },
            },
        })
    }

    /// Size of the tree in nodes plus string and byte lengths: what cloning
    /// it costs.
    fn weight(&self) -> usize {
        let seq = |items: &[Value<T>]| items.iter().map(Value::weight).sum::<usize>();
        1 + match self {
            Self::BigInt(b) | Self::Bytes(b) => b.len(),
            Self::Str(s) => s.len(),
            Self::Tuple(items) | Self::List(items) => seq(items),
            Self::Dict(items) => items.iter().map(|(k, v)| k.weight() + v.weight()).sum(),
            Self::Namespace(attrs) => attrs.iter().map(|(k, v)| k.len() + v.weight()).sum(),
            Self::Object { args, state, .. } => {
                seq(args) + state.as_ref().map_or(0, |s| s.weight())
            }
            Self::Tensor(_) | Self::Storage(_) => 8,
            Self::None | Self::Bool(_) | Self::Int(_) | Self::Float(_) | Self::Global(_) => 0,
        }
    }
}

/// Decodes a pickle into a [`Value`] tree without executing anything.
///
/// Persistent ids must be torch storage references; globals must be on the
/// allow-list described in the module documentation.
pub fn unpickle(data: &[u8]) -> Result<Value, PickleError> {
    Machine::new(data).run()
}

/// A value on the stack or in the memo, with the bookkeeping that keeps
/// hostile input in check.
struct Item {
    value: Value,
    /// Container nesting depth of `value` (0 for scalars).
    depth: usize,
    /// Memo slots that refer to this very object while it is on the stack.
    memo_ids: Vec<u32>,
}

impl Item {
    fn leaf(value: Value) -> Self {
        Self {
            value,
            depth: 0,
            memo_ids: Vec::new(),
        }
    }
}

/// A memo entry.
///
/// Python's memo holds references, and pickle memoizes a container *before*
/// filling it (`EMPTY_DICT`, `BINPUT`, `SETITEMS`). A copy taken at `BINPUT`
/// would therefore be empty. Instead the slot points at the live stack entry
/// until the object leaves the stack, and is then frozen into a copy.
enum Slot {
    Live(usize),
    Frozen { value: Value, depth: usize },
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_start: usize,
    stack: Vec<Item>,
    marks: Vec<usize>,
    memo: HashMap<u32, Slot>,
    /// Remaining weight that may be spent on memo copies.
    copy_budget: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            op_start: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            copy_budget: data.len().saturating_mul(16).saturating_add(1 << 20),
        }
    }

    fn malformed(&self, message: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.op_start,
            message: message.into(),
        }
    }

    fn too_large(&self, message: impl Into<String>) -> PickleError {
        PickleError::TooLarge {
            offset: self.op_start,
            message: message.into(),
        }
    }

    // ---- input -------------------------------------------------------------

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let data = self.data;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= data.len())
            .ok_or(PickleError::Truncated { offset: self.pos })?;
        let bytes = &data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u32_len(&mut self) -> Result<usize, PickleError> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn u64_len(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.array()?);
        // A length beyond the address space is certainly beyond the input.
        usize::try_from(n).map_err(|_| PickleError::Truncated { offset: self.pos })
    }

    /// A newline-terminated line, as used by `GLOBAL`.
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated {
                offset: self.data.len(),
            })?;
        let line = self.take(len + 1)?;
        std::str::from_utf8(&line[..len]).map_err(|_| self.malformed("GLOBAL name is not UTF-8"))
    }

    // ---- stack -------------------------------------------------------------

    fn push(&mut self, item: Item) -> Result<(), PickleError> {
        if item.depth > MAX_DEPTH {
            return Err(self.too_large(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        if self.stack.len() >= MAX_STACK {
            return Err(self.too_large(format!("more than {MAX_STACK} values on the stack")));
        }
        self.stack.push(item);
        Ok(())
    }

    fn push_value(&mut self, value: Value) -> Result<(), PickleError> {
        self.push(Item::leaf(value))
    }

    /// Pushes an empty container, to be filled by later opcodes.
    fn push_empty(&mut self, value: Value) -> Result<(), PickleError> {
        self.push(Item {
            value,
            depth: 1,
            memo_ids: Vec::new(),
        })
    }

    /// Freezes the memo slots of an item that is leaving the stack from
    /// position `index`.
    fn release(&mut self, item: &Item, index: usize) -> Result<(), PickleError> {
        for &id in &item.memo_ids {
            // The id may have been rebound to a later object since.
            if !matches!(self.memo.get(&id), Some(Slot::Live(i)) if *i == index) {
                continue;
            }
            self.charge(&item.value)?;
            self.memo.insert(
                id,
                Slot::Frozen {
                    value: item.value.clone(),
                    depth: item.depth,
                },
            );
        }
        Ok(())
    }

    fn charge(&mut self, value: &Value) -> Result<(), PickleError> {
        self.copy_budget = self
            .copy_budget
            .checked_sub(value.weight())
            .ok_or_else(|| self.too_large("memo references expand beyond 16x the input size"))?;
        Ok(())
    }

    fn pop(&mut self) -> Result<Item, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.malformed("stack underflow: pop below a MARK"));
        }
        let item = self
            .stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))?;
        self.release(&item, self.stack.len())?;
        Ok(item)
    }

    /// Pops everything above the most recent MARK, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Item>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        self.split_off(mark)
    }

    /// Removes the items from stack position `start` up.
    fn split_off(&mut self, start: usize) -> Result<Vec<Item>, PickleError> {
        if start > self.stack.len() {
            return Err(self.malformed("stack underflow"));
        }
        let items = self.stack.split_off(start);
        for (k, item) in items.iter().enumerate() {
            self.release(item, start + k)?;
        }
        Ok(items)
    }

    /// Pops `n` items, in stack order.
    fn pop_n(&mut self, n: usize) -> Result<Vec<Item>, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err(self.malformed("stack underflow"));
        }
        self.split_off(self.stack.len() - n)
    }

    fn top_mut(&mut self) -> Result<&mut Item, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack underflow"));
        }
        let last = self.stack.len() - 1;
        Ok(&mut self.stack[last])
    }

    fn memo_put(&mut self, id: u32) -> Result<(), PickleError> {
        let index = self
            .stack
            .len()
            .checked_sub(1)
            .ok_or_else(|| self.malformed("memoizing with an empty stack"))?;
        self.stack[index].memo_ids.push(id);
        self.memo.insert(id, Slot::Live(index));
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<(), PickleError> {
        let (value, depth) = match self.memo.get(&id) {
            Some(Slot::Frozen { value, depth }) => (value, *depth),
            Some(Slot::Live(index)) => match self.stack.get(*index) {
                Some(item) => (&item.value, item.depth),
                None => return Err(self.malformed(format!("memo key {id} is dangling"))),
            },
            None => return Err(self.malformed(format!("memo key {id} was never stored"))),
        };
        let value = value.clone();
        self.charge(&value)?;
        self.push(Item {
            value,
            depth,
            memo_ids: Vec::new(),
        })
    }

    // ---- execution ---------------------------------------------------------

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            self.op_start = self.pos;
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    let version = self.u8()?;
                    if version > MAX_PROTOCOL {
                        return Err(self.malformed(format!(
                            "pickle protocol {version} is newer than {MAX_PROTOCOL}"
                        )));
                    }
                }
                // FRAME: a buffering hint; the frame's opcodes follow inline.
                0x95 => {
                    self.array::<8>()?;
                }
                // STOP
                b'.' => {
                    let item = self.pop()?;
                    return Ok(item.value);
                }
                // MARK
                b'(' => self.marks.push(self.stack.len()),
                // POP
                b'0' => {
                    self.pop()?;
                }
                // POP_MARK
                b'1' => {
                    self.pop_mark()?;
                }
                // DUP
                b'2' => {
                    let top = self.top_mut()?;
                    let copy = Item {
                        value: top.value.clone(),
                        depth: top.depth,
                        memo_ids: Vec::new(),
                    };
                    self.charge(&copy.value)?;
                    self.push(copy)?;
                }
                b'N' => self.push_value(Value::None)?,
                0x88 => self.push_value(Value::Bool(true))?,
                0x89 => self.push_value(Value::Bool(false))?,
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push_value(Value::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_value(Value::Int(v.into()))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push_value(Value::Int(v.into()))?;
                }
                // LONG1, LONG4
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    self.push_value(decode_long(bytes))?;
                }
                0x8b => {
                    let n = self.u32_len()?;
                    let bytes = self.take(n)?;
                    self.push_value(decode_long(bytes))?;
                }
                // BINFLOAT: big-endian, unlike everything else.
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push_value(Value::Float(v))?;
                }
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                0x8c => {
                    let n = self.u8()? as usize;
                    self.push_str(n)?;
                }
                b'X' => {
                    let n = self.u32_len()?;
                    self.push_str(n)?;
                }
                0x8d => {
                    let n = self.u64_len()?;
                    self.push_str(n)?;
                }
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                b'C' => {
                    let n = self.u8()? as usize;
                    self.push_bytes(n)?;
                }
                b'B' => {
                    let n = self.u32_len()?;
                    self.push_bytes(n)?;
                }
                0x8e | 0x96 => {
                    let n = self.u64_len()?;
                    self.push_bytes(n)?;
                }
                // EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE
                b'}' => self.push_empty(Value::Dict(Vec::new()))?,
                b']' => self.push_empty(Value::List(Vec::new()))?,
                b')' => self.push_empty(Value::Tuple(Vec::new()))?,
                // TUPLE, TUPLE1, TUPLE2, TUPLE3
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let items = self.pop_n(usize::from(op - 0x84))?;
                    self.push_tuple(items)?;
                }
                // APPEND, APPENDS
                b'a' => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                // SETITEM, SETITEMS
                b's' => {
                    let items = self.pop_n(2)?;
                    self.set_items(items)?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' => {
                    let id = self.u8()?;
                    self.memo_put(id.into())?;
                }
                b'r' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len())
                        .map_err(|_| self.too_large("more than 2^32 memo entries"))?;
                    self.memo_put(id)?;
                }
                // BINGET, LONG_BINGET
                b'h' => {
                    let id = self.u8()?;
                    self.memo_get(id.into())?;
                }
                b'j' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.memo_get(id)?;
                }
                // GLOBAL: "module\nname\n"
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_value(Value::Global(Global::resolve(module, name)?))?;
                }
                // STACK_GLOBAL
                0x93 => {
                    let items = self.pop_n(2)?;
                    match (&items[0].value, &items[1].value) {
                        (Value::Str(module), Value::Str(name)) => {
                            let global = Global::resolve(module, name)?;
                            self.push_value(Value::Global(global))?;
                        }
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                // REDUCE
                b'R' => {
                    let mut items = self.pop_n(2)?;
                    // The result holds the arguments' contents, one level down.
                    let depth = items[1].depth;
                    let args = items.pop().map(|i| i.value);
                    let callable = items.pop().map(|i| i.value);
                    match (callable, args) {
                        (Some(Value::Global(global)), Some(Value::Tuple(args))) => {
                            let value = self.reduce(global, args)?;
                            self.push(Item {
                                value,
                                depth,
                                memo_ids: Vec::new(),
                            })?;
                        }
                        _ => return Err(self.malformed("REDUCE needs a global and a tuple")),
                    }
                }
                // NEWOBJ, NEWOBJ_EX
                0x81 => {
                    let items = self.pop_n(2)?;
                    self.new_object(&items[0].value, &items[1].value, None)?;
                }
                0x92 => {
                    let items = self.pop_n(3)?;
                    self.new_object(&items[0].value, &items[1].value, Some(&items[2].value))?;
                }
                // BUILD
                b'b' => {
                    let state = self.pop()?;
                    self.build(state)?;
                }
                // BINPERSID
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid.value)?;
                    self.push_value(Value::Storage(storage))?;
                }
                _ => {
                    return Err(PickleError::UnsupportedOpcode {
                        opcode: op,
                        offset: self.op_start,
                    });
                }
            }
        }
    }

    fn push_str(&mut self, n: usize) -> Result<(), PickleError> {
        let bytes = self.take(n)?;
        let s = String::from_utf8_lossy(bytes).into_owned();
        self.push_value(Value::Str(s))
    }

    fn push_bytes(&mut self, n: usize) -> Result<(), PickleError> {
        let bytes = self.take(n)?.to_vec();
        self.push_value(Value::Bytes(bytes))
    }

    fn push_tuple(&mut self, items: Vec<Item>) -> Result<(), PickleError> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        let value = Value::Tuple(items.into_iter().map(|i| i.value).collect());
        self.push(Item {
            value,
            depth,
            memo_ids: Vec::new(),
        })
    }

    fn append(&mut self, items: Vec<Item>) -> Result<(), PickleError> {
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        let offset = self.op_start;
        let top = self.top_mut()?;
        match &mut top.value {
            Value::List(list) => list.extend(items.into_iter().map(|i| i.value)),
            other => {
                return Err(PickleError::Malformed {
                    offset,
                    message: format!("APPEND to a {}", other.kind()),
                });
            }
        }
        top.depth = top.depth.max(depth);
        self.check_top_depth()
    }

    fn set_items(&mut self, items: Vec<Item>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("SETITEMS with an odd number of items"));
        }
        let depth = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
        let offset = self.op_start;
        let top = self.top_mut()?;
        match &mut top.value {
            Value::Dict(dict) => {
                let mut items = items.into_iter().map(|i| i.value);
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    dict_insert(dict, k, v);
                }
            }
            other => {
                return Err(PickleError::Malformed {
                    offset,
                    message: format!("SETITEM on a {}", other.kind()),
                });
            }
        }
        top.depth = top.depth.max(depth);
        self.check_top_depth()
    }

    fn check_top_depth(&self) -> Result<(), PickleError> {
        match self.stack.last() {
            Some(top) if top.depth > MAX_DEPTH => {
                Err(self.too_large(format!("nesting deeper than {MAX_DEPTH} levels")))
            }
            _ => Ok(()),
        }
    }

    /// Applies a recognised callable to its arguments, as data.
    fn reduce(&self, global: Global, args: Vec<Value>) -> Result<Value, PickleError> {
        match global {
            Global::OrderedDict => self.ordered_dict(args),
            Global::RebuildTensor | Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                self.rebuild_tensor(global, args)
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                self.rebuild_parameter(global, args)
            }
            Global::CodecsEncode => self.codecs_encode(args),
            Global::NumpyScalar => Ok(numpy_scalar(&args).unwrap_or(Value::Object {
                class: global,
                args,
                state: None,
            })),
            Global::NumpyDtype | Global::NumpyReconstruct => Ok(Value::Object {
                class: global,
                args,
                state: None,
            }),
            Global::StorageClass(_)
            | Global::Dtype(_)
            | Global::Namespace
            | Global::NumpyNdarray => {
                Err(self.malformed(format!("{global} is not a supported constructor here")))
            }
        }
    }

    /// `OrderedDict()` or `OrderedDict([(k, v), ...])` (older pickles).
    fn ordered_dict(&self, args: Vec<Value>) -> Result<Value, PickleError> {
        let mut dict = Vec::new();
        match <[Value; 1]>::try_from(args) {
            Ok([Value::List(pairs) | Value::Tuple(pairs)]) => {
                for pair in pairs {
                    match pair {
                        Value::List(kv) | Value::Tuple(kv) if kv.len() == 2 => {
                            let [k, v] = <[Value; 2]>::try_from(kv)
                                .map_err(|_| self.malformed("OrderedDict pair"))?;
                            dict_insert(&mut dict, k, v);
                        }
                        _ => return Err(self.malformed("OrderedDict items must be pairs")),
                    }
                }
            }
            Ok(_) => return Err(self.malformed("OrderedDict argument must be a list of pairs")),
            Err(args) if args.is_empty() => {}
            Err(_) => return Err(self.malformed("OrderedDict takes at most one argument")),
        }
        Ok(Value::Dict(dict))
    }

    /// `_rebuild_parameter(tensor, requires_grad, hooks)` and
    /// `_rebuild_parameter_with_state(tensor, requires_grad, hooks, state)`.
    /// The parameter's hooks and Python attributes (`state`) are not data.
    fn rebuild_parameter(&self, global: Global, args: Vec<Value>) -> Result<Value, PickleError> {
        let arity = if global == Global::RebuildParameter {
            3
        } else {
            4
        };
        let mut args = args.into_iter();
        match (args.len() == arity, args.next(), args.next()) {
            (true, Some(Value::Tensor(mut t)), Some(Value::Bool(requires_grad))) => {
                t.requires_grad = requires_grad;
                Ok(Value::Tensor(t))
            }
            _ => Err(self.malformed(format!(
                "{global}: expected {arity} arguments (tensor, requires_grad, hooks, ...)"
            ))),
        }
    }

    /// The tensor rebuilders:
    /// `_rebuild_tensor(storage, offset, size, stride)`,
    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`,
    /// `_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])`.
    fn rebuild_tensor(&self, global: Global, args: Vec<Value>) -> Result<Value, PickleError> {
        let bad = |what: &str| self.malformed(format!("{global}: {what}"));
        let (min, max) = match global {
            Global::RebuildTensorV2 => (6, 7),
            Global::RebuildTensorV3 => (7, 8),
            _ => (4, 4), // _rebuild_tensor
        };
        if args.len() < min || args.len() > max {
            return Err(bad(&format!(
                "expected {min} to {max} arguments, got {}",
                args.len()
            )));
        }
        let mut args = args.into_iter();
        let mut next = || args.next().unwrap_or(Value::None);
        let Value::Storage(storage) = next() else {
            return Err(bad("first argument is not a storage"));
        };
        let offset = to_usize(&next()).ok_or_else(|| bad("storage offset"))?;
        let shape = to_usizes(&next()).ok_or_else(|| bad("size must be a tuple of ints >= 0"))?;
        let stride =
            to_usizes(&next()).ok_or_else(|| bad("stride must be a tuple of ints >= 0"))?;
        if shape.len() != stride.len() {
            return Err(bad("size and stride differ in length"));
        }
        let requires_grad = match global {
            Global::RebuildTensor => false,
            _ => next()
                .as_bool()
                .ok_or_else(|| bad("requires_grad must be a bool"))?,
        };
        // Backward hooks are never serialised meaningfully; skip them.
        next();
        let dtype = match (global, next(), storage.dtype) {
            (Global::RebuildTensorV3, Value::Global(Global::Dtype(dtype)), _) => dtype,
            (Global::RebuildTensorV3, _, _) => return Err(bad("dtype argument is not a dtype")),
            (_, _, Some(dtype)) => dtype,
            (_, _, None) => return Err(bad("untyped storage without a dtype")),
        };
        Ok(Value::Tensor(TensorRef {
            storage,
            dtype,
            offset,
            shape,
            stride,
            requires_grad,
        }))
    }

    /// `_codecs.encode(text, encoding)`: how protocol 2 pickles `bytes`.
    fn codecs_encode(&self, args: Vec<Value>) -> Result<Value, PickleError> {
        match args.as_slice() {
            [Value::Str(text), Value::Str(encoding)] => match encoding.as_str() {
                "latin1" | "latin-1" | "iso-8859-1" => text
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)).ok())
                    .collect::<Option<Vec<u8>>>()
                    .map(Value::Bytes)
                    .ok_or_else(|| self.malformed("character outside latin-1")),
                "utf8" | "utf-8" => Ok(Value::Bytes(text.as_bytes().to_vec())),
                other => Err(self.malformed(format!("_codecs.encode to {other}"))),
            },
            [Value::Str(text)] => Ok(Value::Bytes(text.as_bytes().to_vec())),
            _ => Err(self.malformed("_codecs.encode needs (str, encoding)")),
        }
    }

    /// `NEWOBJ`: only `argparse.Namespace()` is an allowed class.
    fn new_object(
        &mut self,
        class: &Value,
        args: &Value,
        kwargs: Option<&Value>,
    ) -> Result<(), PickleError> {
        let no_kwargs = kwargs.is_none_or(|k| matches!(k, Value::Dict(d) if d.is_empty()));
        match (class, args) {
            (Value::Global(Global::Namespace), Value::Tuple(a)) if a.is_empty() && no_kwargs => {
                self.push_empty(Value::Namespace(Vec::new()))
            }
            (Value::Global(g), _) => Err(self.malformed(format!("cannot instantiate {g} here"))),
            _ => Err(self.malformed("NEWOBJ needs a class")),
        }
    }

    /// `BUILD`: sets the state of the object on top of the stack.
    fn build(&mut self, state: Item) -> Result<(), PickleError> {
        let offset = self.op_start;
        let malformed = |message: String| PickleError::Malformed { offset, message };
        let top = self.top_mut()?;
        match (&mut top.value, state.value) {
            (Value::Namespace(attrs), Value::Dict(entries)) => {
                for (k, v) in entries {
                    let Value::Str(k) = k else {
                        return Err(malformed("Namespace attribute name is not a str".into()));
                    };
                    match attrs.iter_mut().find(|(name, _)| *name == k) {
                        Some(slot) => slot.1 = v,
                        None => attrs.push((k, v)),
                    }
                }
            }
            // Attributes of an OrderedDict (a state dict's `_metadata`).
            (Value::Dict(_), Value::Dict(_) | Value::None) => return Ok(()),
            (Value::Object { state: slot, .. }, value) if slot.is_none() => {
                *slot = Some(Box::new(value));
            }
            (target, _) => return Err(malformed(format!("BUILD on a {}", target.kind()))),
        }
        top.depth = top.depth.max(1 + state.depth);
        self.check_top_depth()
    }

    /// `BINPERSID` with torch's `('storage', class, key, location, numel)`.
    fn persistent_load(&self, pid: Value) -> Result<StorageRef, PickleError> {
        let Value::Tuple(fields) = pid else {
            return Err(self.malformed(format!("persistent id is a {}", pid.kind())));
        };
        match <[Value; 5]>::try_from(fields) {
            Ok(
                [
                    Value::Str(tag),
                    Value::Global(Global::StorageClass(dtype)),
                    Value::Str(key),
                    Value::Str(location),
                    Value::Int(numel),
                ],
            ) if tag == "storage" && numel >= 0 => Ok(StorageRef {
                key,
                dtype,
                location,
                numel: numel.unsigned_abs(),
            }),
            _ => Err(self.malformed(
                "persistent id is not ('storage', <storage class>, key, location, numel)",
            )),
        }
    }
}

/// Inserts or replaces, as Python's `d[k] = v` does.
fn dict_insert<T: PartialEq>(dict: &mut Vec<(Value<T>, Value<T>)>, k: Value<T>, v: Value<T>) {
    match dict.iter_mut().find(|(key, _)| *key == k) {
        Some(slot) => slot.1 = v,
        None => dict.push((k, v)),
    }
}

/// Little-endian two's complement, as `LONG1`/`LONG4` encode integers.
fn decode_long(bytes: &[u8]) -> Value {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    // Beyond 8 bytes, the value fits only if the extra bytes merely extend
    // the sign of byte 7.
    let fits = bytes.len() <= 8 || {
        let sign7 = if bytes[7] & 0x80 != 0 { 0xff } else { 0 };
        bytes[8..].iter().all(|&b| b == sign7)
    };
    if !fits {
        return Value::BigInt(bytes.to_vec());
    }
    let mut buf = [fill; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    Value::Int(i64::from_le_bytes(buf))
}

fn to_usize(v: &Value) -> Option<usize> {
    v.as_int().and_then(|i| usize::try_from(i).ok())
}

fn to_usizes(v: &Value) -> Option<Vec<usize>> {
    v.as_seq()?.iter().map(to_usize).collect()
}

/// Decodes `numpy.core.multiarray.scalar(dtype, bytes)` for the plain numeric
/// dtypes; `None` leaves it as an opaque object.
fn numpy_scalar(args: &[Value]) -> Option<Value> {
    let [
        Value::Object {
            class: Global::NumpyDtype,
            args: dtype_args,
            state,
        },
        Value::Bytes(bytes),
    ] = args
    else {
        return None;
    };
    let code = dtype_args.first()?.as_str()?;
    // The dtype state is (version, byte order, ...); '|' means "not applicable".
    let big_endian = match state.as_deref() {
        Some(Value::Tuple(s)) => s.get(1).and_then(Value::as_str) == Some(">"),
        _ => false,
    };
    let size: usize = code.get(1..)?.parse().ok()?;
    if bytes.len() != size || !(1..=8).contains(&size) {
        return None;
    }
    let mut buf = [0u8; 8];
    if big_endian {
        buf[..size]
            .iter_mut()
            .zip(bytes.iter().rev())
            .for_each(|(d, s)| *d = *s);
    } else {
        buf[..size].copy_from_slice(bytes);
    }
    let raw = u64::from_le_bytes(buf);
    // Sign-extends the low `size` bytes.
    let shift = 64 - 8 * size as u32;
    let signed = (raw << shift) as i64 >> shift;
    Some(match (code.as_bytes()[0], size) {
        (b'f', 8) => Value::Float(f64::from_bits(raw)),
        (b'f', 4) => Value::Float(f32::from_bits(raw as u32).into()),
        (b'f', 2) => Value::Float(half::f16::from_bits(raw as u16).into()),
        (b'i', 1 | 2 | 4 | 8) => Value::Int(signed),
        (b'u', 1 | 2 | 4 | 8) => Value::Int(i64::try_from(raw).ok()?),
        (b'b', 1) => Value::Bool(raw != 0),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protocol-2 pickle of
    /// `{'a': [1, -2, 3.5, 'x', b'yz', None, True, 2**70], 'b': ('a', 'a')}`
    /// written by hand in the style of CPython (memo, MARK/SETITEMS).
    fn sample() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([0x8c, 1, b'a', b'q', 1, b']', b'q', 2, b'(']);
        p.extend([b'K', 1, b'J']);
        p.extend((-2i32).to_le_bytes());
        p.push(b'G');
        p.extend(3.5f64.to_be_bytes());
        p.extend([b'X', 1, 0, 0, 0, b'x', b'C', 2, b'y', b'z', b'N', 0x88]);
        p.extend([0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0x40]);
        p.extend([b'e', 0x8c, 1, b'b', b'h', 1, b'h', 1, 0x86, b'u', b'.']);
        p
    }

    #[test]
    fn decodes_basic_values() {
        let v = unpickle(&sample()).unwrap();
        let list = v.get("a").and_then(Value::as_seq).unwrap();
        assert_eq!(list[0], Value::Int(1));
        assert_eq!(list[1], Value::Int(-2));
        assert_eq!(list[2], Value::Float(3.5));
        assert_eq!(list[3], Value::Str("x".into()));
        assert_eq!(list[4], Value::Bytes(b"yz".to_vec()));
        assert_eq!(list[5], Value::None);
        assert_eq!(list[6], Value::Bool(true));
        assert_eq!(list[7], Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40]));
        let pair = v.get("b").and_then(Value::as_seq).unwrap();
        assert_eq!(pair, [Value::Str("a".into()), Value::Str("a".into())]);
    }

    #[test]
    fn memo_sees_containers_filled_after_memoization() {
        // d = {'k': 1}; [d, d]: the dict is memoized while still empty.
        let p = [
            0x80, 2, b']', b'q', 0, b'(', b'}', b'q', 1, 0x8c, 1, b'k', b'K', 1, b's', b'h', 1,
            b'e', b'.',
        ];
        let v = unpickle(&p).unwrap();
        let items = v.as_seq().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], items[1]);
        assert_eq!(items[1].get("k"), Some(&Value::Int(1)));
    }

    #[test]
    fn long_integers() {
        assert_eq!(decode_long(&[]), Value::Int(0));
        assert_eq!(decode_long(&[0xff]), Value::Int(-1));
        assert_eq!(decode_long(&[0x00, 0x80]), Value::Int(-32768));
        assert_eq!(decode_long(&[0xff, 0x00]), Value::Int(255));
        let max = i64::MAX.to_le_bytes();
        assert_eq!(decode_long(&max), Value::Int(i64::MAX));
        let mut min_ext = i64::MIN.to_le_bytes().to_vec();
        min_ext.push(0xff);
        assert_eq!(decode_long(&min_ext), Value::Int(i64::MIN));
        let mut big = u64::MAX.to_le_bytes().to_vec();
        big.push(0);
        assert_eq!(decode_long(&big), Value::BigInt(big.clone()));
    }

    #[test]
    fn refuses_unknown_globals() {
        for p in [
            &b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03."[..],
            &b"\x80\x04\x8c\x02os\x8c\x06system\x93."[..],
            &b"\x80\x02ctorch.nn.modules.linear\nLinear\n."[..],
        ] {
            match unpickle(p) {
                Err(PickleError::Refused { module, name }) => {
                    assert!(module.starts_with("os") || module.starts_with("torch.nn"));
                    assert!(name == "system" || name == "Linear");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        let err = unpickle(b"\x80\x02cbuiltins\neval\n.").unwrap_err();
        assert!(err.to_string().contains("builtins.eval"), "{err}");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let full = sample();
        for len in 0..full.len() {
            assert!(
                unpickle(&full[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn garbled_input_is_an_error_not_a_panic() {
        // Deterministic pseudo-random corruptions of one or two bytes.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for full in [sample(), torch_pickle()] {
            for round in 0..10_000 {
                let mut p = full.clone();
                for _ in 0..1 + round % 2 {
                    let r = next();
                    let at = (r as usize) % p.len();
                    p[at] = (r >> 32) as u8;
                }
                let _ = unpickle(&p);
            }
        }
    }

    #[test]
    fn lying_lengths_do_not_allocate() {
        // BINUNICODE8 / BINBYTES8 claiming an exabyte.
        for op in [0x8d, 0x8e] {
            let mut p = vec![0x80, 4, op];
            p.extend(u64::MAX.to_le_bytes());
            assert!(matches!(unpickle(&p), Err(PickleError::Truncated { .. })));
        }
        let p = [0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a'];
        assert!(matches!(unpickle(&p), Err(PickleError::Truncated { .. })));
    }

    #[test]
    fn deep_nesting_is_bounded() {
        // ((((...)))) via TUPLE1, far deeper than the limit.
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, 100_000));
        p.push(b'.');
        assert!(matches!(unpickle(&p), Err(PickleError::TooLarge { .. })));
    }

    #[test]
    fn a_stack_of_a_million_empty_lists_is_refused_early() {
        // `]` × 1,000,000 then APPENDs: each list is shallow until the APPENDs
        // run, so only the stack bound stops the allocation.
        let n = 1_000_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        match unpickle(&p) {
            Err(PickleError::TooLarge { offset, message }) => {
                assert!(message.contains("values on the stack"), "{message}");
                assert_eq!(
                    offset,
                    2 + MAX_STACK,
                    "refused at the first value over the bound"
                );
            }
            other => panic!("{other:?}"),
        }
        // The bound in bytes stays in the tens of MB.
        assert!(MAX_STACK * std::mem::size_of::<Item>() < 64 << 20);
    }

    #[test]
    fn memo_expansion_is_bounded() {
        // x = [x_prev, x_prev] doubled 64 times through the memo.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for i in 0..64u8 {
            p.extend([b'h', i, b'h', i, 0x86, b'q', i + 1]);
        }
        p.push(b'.');
        assert!(matches!(unpickle(&p), Err(PickleError::TooLarge { .. })));
    }

    /// `_rebuild_parameter(_rebuild_tensor_v2(('storage', FloatStorage, '0',
    /// 'cpu', 6), 1, (2, 2), (1, 2), False, OrderedDict()), True, OrderedDict())`
    /// as torch pickles it.
    fn torch_pickle() -> Vec<u8> {
        let mut p = b"\x80\x02ctorch._utils\n_rebuild_parameter\n".to_vec();
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x01K\x02K\x02\x86K\x01K\x02\x86\x89ccollections\nOrderedDict\n)Rq\x00tR");
        p.extend(b"\x88h\x00\x87R.");
        p
    }

    #[test]
    fn torch_tensor_and_parameter() {
        let p = torch_pickle();
        let v = unpickle(&p).unwrap();
        let t = v.as_tensor().unwrap();
        assert_eq!(t.dtype, TorchDtype::F32);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.numel, 6);
        assert_eq!(
            (t.offset, &t.shape[..], &t.stride[..]),
            (1, &[2, 2][..], &[1, 2][..])
        );
        assert!(t.requires_grad);
    }

    #[test]
    fn namespace_and_numpy_scalars() {
        // argparse.Namespace(lr=0.1) and numpy.float64(1.5) as numpy pickles it.
        let mut p = b"\x80\x02(cargparse\nNamespace\n)\x81}X\x02\x00\x00\x00lrG".to_vec();
        p.extend(0.1f64.to_be_bytes());
        p.extend(b"sbcnumpy._core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00f8");
        p.extend(
            b"\x89\x88\x87R(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
        );
        p.extend(b"c_codecs\nencode\nX\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00\xc3\xb8?");
        p.extend(b"X\x06\x00\x00\x00latin1\x86R\x86Rt.");
        let v = unpickle(&p).unwrap();
        let items = v.as_seq().unwrap();
        assert_eq!(items[0].get("lr").and_then(Value::as_float), Some(0.1));
        assert_eq!(items[1], Value::Float(1.5));
    }
}
