//! Helpers shared by the integration tests.

// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use beitv2::data::RgbImage;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// All tensors of a fixture safetensors file.
pub fn load_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |a − b| over all elements; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The values of an integer tensor (token ids) as i64, flattened.
pub fn int_values(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
}

/// A uint8 HWC image stored under `key` in a fixture file.
pub fn rgb_image(st: &SafeTensors<'_>, key: &str) -> RgbImage {
    let view = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(view.dtype(), Dtype::U8, "{key}");
    let &[height, width, 3] = view.shape() else {
        panic!("{key}: shape {:?}", view.shape());
    };
    RgbImage {
        width,
        height,
        data: view.data().to_vec(),
    }
}

/// A scalar tensor of any float dtype as f64.
pub fn scalar_f64(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// max |a − b| / max(|b|, 1e-6) over all elements (f32 tensors).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64 / scale)
        .fold(0.0, f64::max)
}

/// An image folder with two classes of `n` synthetic `w`×`h` PNGs each.
pub fn write_class_folders(root: &Path, n: u32, (w, h): (u32, u32)) {
    for (c, class) in ["circle", "square"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let v = ((x * 7 + y * 13 + i * 31 + c as u32 * 90) % 255) as u8;
                image::Rgb([v, 255 - v, (v / 2) + c as u8 * 100])
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// The records of a run's `metrics.jsonl`, without the wall-clock field.
pub fn metrics_without_time(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("elapsed_s");
            v
        })
        .collect()
}

/// Trials of the kill-resume harness: `BEITV2_KILL_TRIALS` (CI runs the
/// default; the documented long check sets 25).
pub fn kill_trials(default: usize) -> usize {
    std::env::var("BEITV2_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SIGKILLs `beitv2 ARGS` (a training command writing to `out`) at random
/// moments, then runs it to the end, `trials` times from a clean `out`
/// (`trials` from [`kill_trials`]). Each trial kills twice: once within
/// `span` (the uninterrupted run's duration), once at a random moment of the
/// resumed run. After each trial, `out/WEIGHTS` and every metrics record must
/// equal those of the uninterrupted run in `reference`, bit for bit.
pub fn kill_resume_trials(
    args: &[&str],
    out: &Path,
    reference: &Path,
    weights: &str,
    span: std::time::Duration,
    default_trials: usize,
) {
    use std::process::{Command, Stdio};
    let want = sorted_weights(&reference.join(weights));
    let want_metrics = metrics_without_time(reference);
    let verbose = std::env::var_os("BEITV2_KILL_VERBOSE").is_some();
    let trials = kill_trials(default_trials);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut landed = 0;
    for trial in 0..trials {
        if out.exists() {
            std::fs::remove_dir_all(out).unwrap();
        }
        for _ in 0..2 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let delay = span.mul_f64((state >> 11) as f64 / (1u64 << 53) as f64);
            let mut child = Command::new(env!("CARGO_BIN_EXE_beitv2"))
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(delay);
            let running = child.try_wait().unwrap().is_none();
            landed += running as usize;
            if verbose {
                eprintln!("trial {trial}: kill after {delay:?} (running: {running})");
            }
            let _ = child.kill(); // SIGKILL on Unix
            child.wait().unwrap();
        }
        if verbose {
            let mut files = walk(out);
            files.sort();
            eprintln!("trial {trial}: left {files:?}");
        }
        let done = Command::new(env!("CARGO_BIN_EXE_beitv2"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            done.status.success(),
            "trial {trial}: the resumed run failed: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        let got = sorted_weights(&out.join(weights));
        let differ: Vec<&str> = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g != w)
            .map(|(g, _)| g.0.as_str())
            .collect();
        assert!(
            got.len() == want.len() && differ.is_empty(),
            "trial {trial}: weights differ in {differ:?}"
        );
        let got = metrics_without_time(out);
        let show = |m: &[serde_json::Value]| {
            m.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n  ")
        };
        assert!(
            got == want_metrics,
            "trial {trial}: metrics differ:\ngot\n  {}\nwant\n  {}",
            show(&got),
            show(&want_metrics)
        );
    }
    eprintln!(
        "{}: {trials} trials passed, {landed} of {} kills landed in a running process",
        args[0],
        2 * trials
    );
}

/// Every file under `dir` with its size, relative to `dir`.
fn walk(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    out
}

/// Every tensor of a safetensors file as (name, f32 values), sorted by name,
/// for exact comparisons of two runs' weights.
pub fn sorted_weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
