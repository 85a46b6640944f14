//! The inference kernels against the composite (training) path and against
//! timm, and the error of the reduced-precision paths against fp32. One test
//! function: the fused-kernel switch is process-wide.

use beitv2::checkpoint::{LoadOptions, load_model};
use beitv2::kernels::{self, Precision};
use beitv2::model::BeitConfig;
mod common;

use candle_core::{D, Tensor};
use common::{load_st, max_abs_diff};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

fn load(case: &str) -> beitv2::model::Beit {
    let dir = fixtures().join(case);
    let cfg = BeitConfig::from_file(&dir.join("config.json")).unwrap();
    let opts = LoadOptions {
        config: Some(cfg),
        ..Default::default()
    };
    load_model(&dir.join("timm.safetensors"), &opts).unwrap()
}

fn argmax(t: &Tensor) -> Vec<u32> {
    t.argmax(D::Minus1).unwrap().to_vec1().unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn fused_kernels_match_the_composite_path_and_reduced_precision_stays_close() {
    for case in ["v2_avg", "v1_token", "shared"] {
        let mut model = load(case);
        let io = load_st(&fixtures().join(case).join("io.safetensors"));
        let x = &io["input"];
        let want = &io["logits"];

        kernels::set_fused(true);
        let fused = model.forward(x).unwrap();
        kernels::set_fused(false);
        let composite = model.forward(x).unwrap();
        kernels::set_fused(true);
        let d = max_abs_diff(&fused, &composite);
        assert!(d <= 1e-5, "{case}: fused vs composite {d}");
        let d = max_abs_diff(&fused, want);
        assert!(d <= 1e-4, "{case}: fused vs timm {d}");

        // bf16 keeps 8 significant bits (relative rounding 2⁻⁹), int8 about 7
        // per operand; through two blocks the logits stay within a few percent
        // of their range.
        let scale = max_abs(want);
        for (precision, bound) in [(Precision::Bf16, 0.015), (Precision::Int8, 0.05)] {
            model.set_precision(precision).unwrap();
            let got = model.forward(x).unwrap();
            let rel = max_abs_diff(&got, want) / scale;
            eprintln!("{case}: {precision:?} max logit error {rel:.2e} of the logit range");
            assert!(
                rel <= bound,
                "{case}: {precision:?} logits off by {rel} of their range"
            );
            // The switch does not apply to packed weights: they keep running.
            kernels::set_fused(false);
            let again = model.forward(x).unwrap();
            kernels::set_fused(true);
            assert_eq!(
                max_abs_diff(&got, &again),
                0.0,
                "{case}: packed path not taken"
            );
        }
        // fp32 packed for the small-batch AVX-512 kernel (where the CPU has it).
        model.set_precision(Precision::F32).unwrap();
        let packed = model.forward(x).unwrap();
        let d = max_abs_diff(&packed, &composite);
        assert!(d <= 1e-5, "{case}: packed fp32 vs composite {d}");
        assert_eq!(argmax(&fused), argmax(want), "{case}: fp32 top-1");
    }
}
