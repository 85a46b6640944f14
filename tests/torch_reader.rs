//! Reads the checkpoints written by `tools/make_pth_fixtures.py` and checks
//! every tensor against `expected.safetensors`, the decoded structure, and the
//! refusals.

use std::path::{Path, PathBuf};

use beitv2::checkpoint::pickle::Value;
use beitv2::checkpoint::torch::{
    TorchValue, find_state_dict, read_torch_file, tensors_with_prefix,
};
use candle_core::{DType, Tensor};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

fn read(name: &str) -> TorchValue {
    read_torch_file(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn read_err(name: &str) -> String {
    match read_torch_file(&fixture(name)) {
        Ok(v) => panic!("{name} was read: {v:?}"),
        Err(e) => format!("{e:#}"),
    }
}

/// `Debug` of the entry `key` of a dict or namespace, to compare tensor-free
/// values (tensors have no `PartialEq`).
fn debug(v: &TorchValue, key: &str) -> String {
    format!("{:?}", v.get(key).unwrap_or_else(|| panic!("no key {key}")))
}

/// Elements of `t` as little-endian bytes of its own dtype.
fn le_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// The candle dtype and little-endian bytes the reader must produce for a
/// safetensors tensor (widening int32/int16/int8 to i64, uint16 to u32, bool
/// to u8).
fn expected_candle(dtype: Dtype, data: &[u8]) -> (DType, Vec<u8>) {
    fn widen<const N: usize, W>(data: &[u8], f: impl Fn([u8; N]) -> W) -> Vec<W> {
        data.as_chunks::<N>().0.iter().map(|c| f(*c)).collect()
    }
    let as_i64 = |v: Vec<i64>| v.iter().flat_map(|x| x.to_le_bytes()).collect();
    match dtype {
        Dtype::F64 => (DType::F64, data.to_vec()),
        Dtype::F32 => (DType::F32, data.to_vec()),
        Dtype::F16 => (DType::F16, data.to_vec()),
        Dtype::BF16 => (DType::BF16, data.to_vec()),
        Dtype::I64 => (DType::I64, data.to_vec()),
        Dtype::U8 | Dtype::BOOL => (DType::U8, data.to_vec()),
        Dtype::U32 => (DType::U32, data.to_vec()),
        Dtype::I32 => (
            DType::I64,
            as_i64(widen(data, |c| i32::from_le_bytes(c).into())),
        ),
        Dtype::I16 => (
            DType::I64,
            as_i64(widen(data, |c| i16::from_le_bytes(c).into())),
        ),
        Dtype::I8 => (
            DType::I64,
            as_i64(widen(data, |c| i8::from_le_bytes(c).into())),
        ),
        Dtype::U16 => (
            DType::U32,
            widen(data, u16::from_le_bytes)
                .iter()
                .flat_map(|&x| u32::from(x).to_le_bytes())
                .collect(),
        ),
        other => panic!("no expectation for {other:?}"),
    }
}

/// Checks every tensor of every fixture, by name, against the expectations;
/// also that each fixture holds exactly the expected tensors.
#[test]
fn every_tensor_matches_torch() {
    let bytes = std::fs::read(fixture("expected.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = expected.names();
    names.sort();
    let stems: std::collections::BTreeSet<&str> =
        names.iter().map(|n| n.split_once('/').unwrap().0).collect();
    let mut checked = 0;
    for stem in stems {
        let value = read(&format!("{stem}.pth"));
        let tensors = tensors_with_prefix(&value);
        let prefix = format!("{stem}/");
        let want: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix))
            .collect();
        let mut got: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        got.sort();
        assert_eq!(got, want, "{stem}: tensor names");
        for (name, tensor) in &tensors {
            let view = expected.tensor(&format!("{prefix}{name}")).unwrap();
            let (dtype, data) = expected_candle(view.dtype(), view.data());
            assert_eq!(tensor.dims(), view.shape(), "{stem}/{name}: shape");
            assert_eq!(tensor.dtype(), dtype, "{stem}/{name}: dtype");
            assert_eq!(le_bytes(tensor), data, "{stem}/{name}: values");
            checked += 1;
        }
    }
    assert_eq!(checked, names.len());
}

#[test]
fn views_and_special_shapes() {
    let v = read("state_dict.pth");
    let get = |k: &str| v.get(k).and_then(Value::as_tensor).unwrap().clone();
    assert_eq!(get("shape.scalar").dims(), &[] as &[usize]);
    assert_eq!(get("shape.scalar").to_scalar::<f32>().unwrap(), 2.5);
    assert_eq!(get("shape.empty").dims(), &[0, 3]);
    let base = get("view.base");
    let t = get("view.transposed");
    assert_eq!(t.dims(), &[6, 4]);
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        base.t().unwrap().to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        get("view.rows").to_vec2::<f32>().unwrap(),
        base.narrow(0, 1, 2).unwrap().to_vec2::<f32>().unwrap()
    );
    assert_eq!(get("dtype.bool").to_vec1::<u8>().unwrap(), [1, 0, 1, 1]);
    assert_eq!(
        get("dtype.i64").to_vec1::<i64>().unwrap(),
        [0, -1, 1 << 62, i64::MIN, i64::MAX]
    );
}

#[test]
fn nested_training_checkpoint() {
    let v = read("nested.pth");
    assert_eq!(debug(&v, "epoch"), "Int(3)");
    let args = v.get("args").unwrap();
    assert!(matches!(args, Value::Namespace(_)));
    assert_eq!(args.get("lr").and_then(Value::as_float), Some(0.1));
    assert_eq!(args.get("name").and_then(Value::as_str), Some("x"));
    assert_eq!(args.get("flag").and_then(Value::as_bool), Some(true));
    assert_eq!(debug(args, "none"), "None");
    assert_eq!(debug(args, "layers"), "List([Int(1), Int(2)])");
    assert_eq!(debug(&v, "np_metric"), "Float(0.25)");
    assert_eq!(debug(&v, "np_int"), "Int(-7)");
    assert_eq!(debug(&v, "np_f32"), "Float(1.5)");
    // 2**70 as little-endian two's complement.
    assert_eq!(debug(&v, "big"), "BigInt([0, 0, 0, 0, 0, 0, 0, 0, 64])");
    assert_eq!(debug(&v, "bytes"), "Bytes([97, 98, 0, 255])");
    assert_eq!(
        debug(&v, "tuple"),
        r#"Tuple([Int(1), Str("a"), Float(2.5)])"#
    );
    let (key, sd) = find_state_dict(&v);
    assert_eq!(key, Some("model"));
    let names: Vec<String> = tensors_with_prefix(sd)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["weight", "bias"]);
}

#[test]
fn mmengine_checkpoint() {
    let v = read("mmengine.pth");
    let (key, sd) = find_state_dict(&v);
    assert_eq!(key, Some("state_dict"));
    assert_eq!(sd.as_dict().map(<[_]>::len), Some(2));
    let meta = v.get("meta").unwrap();
    assert_eq!(meta.get("epoch").and_then(Value::as_int), Some(12));
    assert_eq!(
        debug(meta.get("dataset_meta").unwrap(), "classes"),
        r#"Tuple([Str("cat"), Str("dog")])"#
    );
}

#[test]
fn plain_state_dict_is_its_own_state_dict() {
    let v = read("state_dict.pth");
    let (key, sd) = find_state_dict(&v);
    assert_eq!(key, None);
    assert!(std::ptr::eq(sd, &v));
    // A module's state dict: keys in insertion order, `_metadata` dropped.
    let keys: Vec<&str> = v
        .as_dict()
        .unwrap()
        .iter()
        .map(|(k, _)| k.as_str().unwrap())
        .collect();
    assert_eq!(&keys[..3], ["0.weight", "0.bias", "1.weight"]);
}

#[test]
fn pickle_protocol_4() {
    let v = read("protocol4.pth");
    assert_eq!(
        v.get("step").and_then(Value::as_int),
        Some(1_000_000_000_000)
    );
    assert_eq!(find_state_dict(&v).0, Some("model"));
}

#[test]
fn bare_parameter() {
    let v = read("parameter.pth");
    assert_eq!(v.as_tensor().unwrap().dims(), &[2, 3]);
}

#[test]
fn refuses_legacy_format() {
    let e = read_err("legacy.pth");
    assert!(e.contains("legacy.pth"), "{e}");
    assert!(e.contains("PyTorch < 1.6") && e.contains("re-save"), "{e}");
}

#[test]
fn refuses_code() {
    let e = read_err("malicious.pth");
    assert!(e.contains("refusing to load os.system from "), "{e}");
    assert!(e.contains("malicious.pth"), "{e}");
    let e = read_err("module.pth");
    assert!(
        e.contains("refusing to load torch.nn.modules.linear.Linear from "),
        "{e}"
    );
    assert!(e.contains("module.pth"), "{e}");
    let e = read_err("torchscript.pt");
    assert!(
        e.contains("torchscript.pt") && e.contains("TorchScript"),
        "{e}"
    );
}

#[test]
fn truncated_and_foreign_files_are_errors() {
    let e = read_err("truncated.pth");
    assert!(
        e.contains("truncated.pth") && e.contains("truncated"),
        "{e}"
    );
    let e = read_err("expected.safetensors");
    assert!(
        e.contains("expected.safetensors") && e.contains("not a PyTorch checkpoint"),
        "{e}"
    );
    let e = read_err("missing.pth");
    assert!(e.contains("missing.pth"), "{e}");
}

/// Every prefix and many single-byte corruptions of a real checkpoint are
/// either read or rejected, never a panic or a wrong-length tensor.
#[test]
fn damaged_files_never_panic() {
    let original = std::fs::read(fixture("state_dict.pth")).unwrap();
    let dir = std::env::temp_dir().join(format!("beitv2-torch-reader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("damaged.pth");
    let try_bytes = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(v) = read_torch_file(&path) {
            for (_, t) in tensors_with_prefix(&v) {
                assert_eq!(t.elem_count(), t.dims().iter().product::<usize>());
            }
        }
    };
    for len in (0..original.len()).step_by(61) {
        try_bytes(&original[..len]);
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..400 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut bytes = original.clone();
        let at = (state as usize) % bytes.len();
        bytes[at] = (state >> 40) as u8;
        try_bytes(&bytes);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Tensors that lie about their storage and a pickle whose stack grows
/// without bound are refused with an error naming the file and the fault.
#[test]
fn hostile_checkpoints_are_refused_with_the_fault_named() {
    for (name, fault) in [
        (
            "hostile_past_end.pth",
            "size [1000000], stride [1]) reaches past its storage of 10",
        ),
        (
            "hostile_offset_past.pth",
            "(offset 5, size [10], stride [1]) reaches past its storage",
        ),
        (
            "hostile_overflow.pth",
            "size [2147483647, 2147483647, 2147483647] overflows",
        ),
        (
            "hostile_short_storage.pth",
            "reaches past its storage of 2 float32 elements",
        ),
        (
            "hostile_negative_stride.pth",
            "stride must be a tuple of ints >= 0",
        ),
        ("hostile_stack.pth", "more than 262144 values on the stack"),
    ] {
        let e = read_err(name);
        assert!(e.contains(name) && e.contains(fault), "{name}: {e}");
    }
}
