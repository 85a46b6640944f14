//! The inference kernels against the composite (training) path and against
//! timm, and the error of the reduced-precision paths against fp32, under
//! every ISA level this machine runs (the cap forces each lower one). One
//! test function: the fused-kernel switch and the ISA cap are process-wide.

use beitv2::checkpoint::{LoadOptions, load_model};
use beitv2::kernels::{self, Precision, isa};
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
    let levels = isa::supported();
    eprintln!("ISA levels run here: {levels:?}");
    for level in levels {
        isa::set_cap(Some(level)).unwrap();
        assert_eq!(isa::active(), level);
        check_every_fixture_model(level);
        check_training_ops(level);
    }
    isa::set_cap(None).unwrap();
}

fn check_every_fixture_model(level: isa::Isa) {
    for case in ["v2_avg", "v1_token", "shared"] {
        let case_name = format!("{case}@{level}");
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
        assert!(d <= 1e-5, "{case_name}: fused vs composite {d}");
        let d = max_abs_diff(&fused, want);
        assert!(d <= 1e-4, "{case_name}: fused vs timm {d}");

        // bf16 keeps 8 significant bits (relative rounding 2⁻⁹), int8 about 7
        // per operand; through two blocks the logits stay within a few percent
        // of their range.
        let scale = max_abs(want);
        for (precision, bound) in [(Precision::Bf16, 0.015), (Precision::Int8, 0.05)] {
            model.set_precision(precision).unwrap();
            let got = model.forward(x).unwrap();
            let rel = max_abs_diff(&got, want) / scale;
            eprintln!("{case_name}: {precision:?} max logit error {rel:.2e} of the logit range");
            assert!(
                rel <= bound,
                "{case_name}: {precision:?} logits off by {rel} of their range"
            );
            // The switch does not apply to packed weights: they keep running.
            kernels::set_fused(false);
            let again = model.forward(x).unwrap();
            kernels::set_fused(true);
            assert_eq!(
                max_abs_diff(&got, &again),
                0.0,
                "{case_name}: packed path not taken"
            );
        }
        // fp32 packed for the small-batch AVX-512 kernel (where the CPU has it).
        model.set_precision(Precision::F32).unwrap();
        let packed = model.forward(x).unwrap();
        let d = max_abs_diff(&packed, &composite);
        assert!(d <= 1e-5, "{case_name}: packed fp32 vs composite {d}");
        assert_eq!(argmax(&fused), argmax(want), "{case_name}: fp32 top-1");
    }
}

/// The training ops' element-wise kernels (GELU, softmax, LayerNorm) and
/// their gradients against candle's composites at `level`.
fn check_training_ops(level: isa::Isa) {
    use beitv2::kernels::autograd::{gelu_op, layer_norm_op, softmax_op};
    use candle_core::{Device, Var};
    let n = 3 * 7 * 37; // odd widths exercise the vector remainders
    let x = Var::from_tensor(
        &Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 7919) % 401) as f32 / 50.0 - 4.0)
                .collect::<Vec<_>>(),
            (3, 7, 37),
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let w = Tensor::from_vec(
        (0..37).map(|i| 0.5 + i as f32 / 37.0).collect::<Vec<_>>(),
        37,
        &Device::Cpu,
    )
    .unwrap();
    let b = (&w * 0.1).unwrap();
    let ln_ref = |x: &Tensor| {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = xc
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        xn.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
    };
    type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let pairs: [(&str, Op, Op); 3] = [
        (
            "gelu",
            Box::new(|x| gelu_op(x).unwrap().unwrap()),
            Box::new(|x| x.gelu_erf().unwrap()),
        ),
        (
            "softmax",
            Box::new(|x| softmax_op(x).unwrap().unwrap()),
            Box::new(|x| candle_nn::ops::softmax(x, D::Minus1).unwrap()),
        ),
        (
            "layer norm",
            Box::new(|x| layer_norm_op(x, &w, &b, 1e-6).unwrap().unwrap()),
            Box::new(ln_ref),
        ),
    ];
    let weight = (x.as_tensor().cos().unwrap() + 1.5).unwrap().detach();
    for (name, fused, reference) in pairs {
        let (a, r) = (fused(x.as_tensor()), reference(x.as_tensor()));
        let d = max_abs_diff(&a, &r);
        assert!(d <= 1e-5, "{name}@{level}: forward differs by {d}");
        let ga = (&a * &weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (&r * &weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_abs_diff(ga.get(&x).unwrap(), gr.get(&x).unwrap());
        assert!(d <= 2e-5, "{name}@{level}: gradient differs by {d}");
    }
}
