//! The `beitv2` binary end to end on the tiny fixture model: output formats,
//! bad images skipped and reported with a non-zero exit, features files,
//! `info`, `convert`, and hub resolution from a local cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> (PathBuf, PathBuf) {
    let d = root().join("tests/fixtures/models/v2_avg");
    (d.join("timm.safetensors"), d.join("config.json"))
}

fn beitv2(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_beitv2"));
    c.args(args).current_dir(root());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run beitv2")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One JSON value a line (the `--json` / `--format json` outputs).
fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beitv2-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn classify_json_skips_bad_images_and_fails_at_the_end() {
    let (w, c) = tiny();
    let imgs = root().join("tests/fixtures/images");
    let failed = temp_dir("failures").join("failed.jsonl");
    let out = beitv2(
        &[
            "classify",
            "--failures",
            failed.to_str().unwrap(),
            "--weights",
            w.to_str().unwrap(),
            "--config",
            c.to_str().unwrap(),
            "--format",
            "json",
            "--top-k",
            "3",
            "--batch-size",
            "4",
            "assets/photos/chelsea.png",
            imgs.join("truncated.png").to_str().unwrap(),
            imgs.join("not_an_image.jpg").to_str().unwrap(),
            "assets/photos/coffee.png",
        ],
        &[],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "must exit non-zero when images fail");
    let lines = json_lines(&stdout);
    assert_eq!(lines.len(), 2, "{stdout}");
    for (v, name) in lines.iter().zip(["chelsea.png", "coffee.png"]) {
        assert!(v["path"].as_str().unwrap().ends_with(name));
        let top = v["top_k"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let scores: Vec<f64> = top.iter().map(|p| p["score"].as_f64().unwrap()).collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "best first: {scores:?}"
        );
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
        let idx = top[0]["class_index"].as_u64().unwrap();
        assert_eq!(top[0]["label"], format!("class_{idx}"));
    }
    assert!(
        stderr.contains("truncated.png") && stderr.contains("not_an_image.jpg"),
        "{stderr}"
    );
    assert!(stderr.contains("2 of 4 images"), "{stderr}");
    // The same two, machine-readable.
    let listed = json_lines(&std::fs::read_to_string(&failed).unwrap());
    assert_eq!(listed.len(), 2);
    for (v, name) in listed.iter().zip(["truncated.png", "not_an_image.jpg"]) {
        assert!(v["path"].as_str().unwrap().ends_with(name), "{v}");
        assert!(!v["error"].as_str().unwrap().is_empty(), "{v}");
    }
}

#[test]
fn classify_csv_and_table() {
    let (w, c) = tiny();
    let args = |fmt: &'static str| {
        vec![
            "classify".to_string(),
            "--weights".into(),
            w.display().to_string(),
            "--config".into(),
            c.display().to_string(),
            "--format".into(),
            fmt.into(),
            "--top-k".into(),
            "2".into(),
            "assets/photos".into(),
        ]
    };
    let run = |fmt| {
        let a = args(fmt);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        beitv2(&a, &[])
    };
    let csv = run("csv");
    assert!(csv.status.success(), "{}", text(&csv.stderr));
    let csv = text(&csv.stdout);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "path,rank,class_index,label,score");
    assert_eq!(rows.len(), 1 + 4 * 2, "{csv}");
    let table = run("table");
    assert!(table.status.success());
    assert!(text(&table.stdout).contains("rocket.png"));
}

#[test]
fn features_to_safetensors_and_npy() {
    let (w, c) = tiny();
    let dir = temp_dir("features");
    let st = dir.join("f.safetensors");
    let out = beitv2(
        &[
            "features",
            "--weights",
            w.to_str().unwrap(),
            "--config",
            c.to_str().unwrap(),
            "--kind",
            "intermediate",
            "--layers",
            "0,-1",
            "-o",
            st.to_str().unwrap(),
            "assets/photos/chelsea.png",
            "assets/photos/rocket.png",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.len(), 2);
    let f = &t["assets/photos/chelsea.png"];
    assert_eq!(f.dims(), &[2, 17, 16]); // 2 layers, CLS + 4×4 patches, width 16
    let npy = dir.join("f.npy");
    let out = beitv2(
        &[
            "features",
            "--weights",
            w.to_str().unwrap(),
            "--config",
            c.to_str().unwrap(),
            "--kind",
            "mean",
            "-o",
            npy.to_str().unwrap(),
            "assets/photos",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(&npy).unwrap();
    assert!(text(&bytes[..80]).contains("'shape': (4, 16)"));
    let paths = std::fs::read_to_string(dir.join("f.paths.txt")).unwrap();
    assert_eq!(paths.lines().count(), 4);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn info_json_reports_published_counts() {
    let out = beitv2(
        &[
            "info",
            "--arch",
            "beitv2_base_patch16_224",
            "--format",
            "json",
        ],
        &[],
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["params"], 86_530_984u64);
    assert_eq!(v["macs"], 17_581_219_584u64);
    assert_eq!(v["input_size"], serde_json::json!([3, 224, 224]));
}

#[test]
fn hub_ids_resolve_from_the_cache_and_explain_offline_failure() {
    let (w, c) = tiny();
    let home = temp_dir("hub");
    let repo = home.join("hub/models--local--tiny-beit");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::fs::copy(&w, snap.join("model.safetensors")).unwrap();
    let envs = [("HF_HOME", home.as_path())];
    let out = beitv2(
        &[
            "classify",
            "--model",
            "local/tiny-beit",
            "--config",
            c.to_str().unwrap(),
            "--format",
            "json",
            "assets/photos/chelsea.png",
        ],
        &envs,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_beitv2"));
    let out = cmd
        .args([
            "classify",
            "--model",
            "timm/beitv2_base_patch16_224.in1k_ft_in1k",
            "assets/photos",
        ])
        .current_dir(root())
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--weights") && err.contains("beitv2_base_patch16_224"),
        "{err}"
    );
    let out = beitv2(&["classify", "assets/photos"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--weights FILE"));
    std::fs::remove_dir_all(home).unwrap();
}

#[test]
fn convert_writes_a_self_describing_file() {
    let (_, c) = tiny();
    let dir = temp_dir("convert");
    let out_path = dir.join("tiny.safetensors");
    let mmp = root().join("tests/fixtures/models/v2_avg/mmpretrain.pth");
    let out = beitv2(
        &[
            "convert",
            "--weights",
            mmp.to_str().unwrap(),
            "--config",
            c.to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // No --config needed any more.
    let out = beitv2(
        &[
            "classify",
            "--weights",
            out_path.to_str().unwrap(),
            "assets/photos/coffee.png",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eval_prints_a_json_summary_and_checks_labels() {
    let (w, c) = tiny();
    let dir = temp_dir("eval");
    let list = dir.join("val.txt");
    std::fs::write(&list, "chelsea.png 3\ncoffee.png 1\nrocket.png 9\n").unwrap();
    let spec = format!(
        "{}@{}",
        root().join("assets/photos").display(),
        list.display()
    );
    let eval = || {
        beitv2(
            &[
                "eval",
                "--weights",
                w.to_str().unwrap(),
                "--config",
                c.to_str().unwrap(),
                "--data",
                &spec,
            ],
            &[],
        )
    };
    let out = eval();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["n"], 3);
    for k in ["top1", "top5", "loss", "model", "img_size", "crop_pct"] {
        assert!(!v[k].is_null(), "missing {k}: {v}");
    }
    let top1 = v["top1"].as_f64().unwrap();
    assert!(
        [0.0, 100.0 / 3.0, 200.0 / 3.0, 100.0]
            .iter()
            .any(|x| (x - top1).abs() < 1e-9)
    );
    // A label the 10-class model cannot have is refused, naming the sample.
    std::fs::write(&list, "chelsea.png 3\ncoffee.png 12\n").unwrap();
    let out = eval();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("coffee.png") || err.contains("12"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tokenize_prints_grids_and_codebook_stats() {
    let v = root().join("tests/fixtures/vqkd");
    let out = beitv2(
        &[
            "tokenize",
            "--tokenizer",
            v.join("photo_unilm.pth").to_str().unwrap(),
            "--config",
            v.join("photo_config.json").to_str().unwrap(),
            "--stats",
            "assets/photos",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = json_lines(&text(&out.stdout));
    assert_eq!(lines.len(), 5, "4 images and the stats line");
    for img in &lines[..4] {
        let rows = img["tokens"].as_array().unwrap();
        assert_eq!(rows.len(), 14);
        assert!(rows.iter().all(|r| r.as_array().unwrap().len() == 14));
    }
    let stats = &lines[4];
    assert_eq!(stats["tokens"], 4 * 196);
    let hist: u64 = stats["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(hist, 4 * 196);
    let used = stats["used_codes"].as_u64().unwrap();
    assert_eq!(used + stats["unused_codes"].as_u64().unwrap(), 64);
    let ppl = stats["perplexity"].as_f64().unwrap();
    assert!(ppl >= 1.0 && ppl <= used as f64, "{ppl}");
}

#[test]
fn every_isa_level_classifies_alike_and_an_unknown_level_is_refused() {
    let (w, c) = tiny();
    let (w, c) = (w.to_str().unwrap(), c.to_str().unwrap());
    let args = [
        "classify",
        "--weights",
        w,
        "--config",
        c,
        "--format",
        "csv",
        "assets/photos/chelsea.png",
    ];
    let mut outputs = Vec::new();
    for level in beitv2::kernels::isa::supported() {
        let level = std::path::PathBuf::from(level.name());
        let out = beitv2(&args, &[("BEITV2_ISA", &level)]);
        assert!(out.status.success(), "{level:?}: {}", text(&out.stderr));
        outputs.push(text(&out.stdout));
    }
    assert!(outputs.windows(2).all(|p| p[0] == p[1]), "{outputs:?}");
    let out = beitv2(&args, &[("BEITV2_ISA", Path::new("avx9"))]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("BEITV2_ISA") && err.contains("avx9") && err.contains("avx2"),
        "{err}"
    );
}

#[test]
fn weights_holding_nan_or_inf_load_with_a_warning_naming_them() {
    let (w, c) = tiny();
    let mut tensors = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    for (key, value) in [
        ("head.weight", f32::NAN),
        ("blocks.0.norm1.bias", f32::INFINITY),
    ] {
        let t = &tensors[key];
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[1] = value;
        let shape = t.shape().clone();
        tensors.insert(
            key.to_string(),
            candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap(),
        );
    }
    let dir = temp_dir("nan-weights");
    let bad = dir.join("nan.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let out = beitv2(
        &[
            "classify",
            "--weights",
            bad.to_str().unwrap(),
            "--config",
            c.to_str().unwrap(),
            "assets/photos/chelsea.png",
        ],
        &[],
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("2 tensor(s) hold NaN or Inf values")
            && err.contains("head.weight (1 of")
            && err.contains("blocks.0.norm1.bias (1 of"),
        "{err}"
    );
}

#[test]
fn awkward_file_names_survive_every_output_format() {
    use std::os::unix::ffi::OsStrExt;
    let dir = temp_dir("names");
    let names: [&[u8]; 4] = [
        b"new\nline.png",
        b"quo\"te,comma.png",
        b"bad\xff\xfe.png",
        b"tab\there.png",
    ];
    for n in names {
        std::fs::copy(
            root().join("assets/photos/chelsea.png"),
            dir.join(std::ffi::OsStr::from_bytes(n)),
        )
        .unwrap();
    }
    let (w, c) = tiny();
    let run = |format: &str| {
        let out = beitv2(
            &[
                "classify",
                "--weights",
                w.to_str().unwrap(),
                "--config",
                c.to_str().unwrap(),
                "--format",
                format,
                "--top-k",
                "1",
                dir.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let d = dir.to_str().unwrap();
    let mut want: Vec<String> = [
        "new\nline.png",
        "quo\"te,comma.png",
        "bad\\xff\\xfe.png",
        "tab\there.png",
    ]
    .iter()
    .map(|n| format!("{d}/{n}"))
    .collect();
    want.sort();
    // JSON: one object per line, the exact names back.
    let json = run("json");
    let mut got: Vec<String> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    got.sort();
    assert_eq!(got, want);
    // CSV (RFC 4180): fields with a comma, quote or newline are quoted, quotes doubled.
    let csv = run("csv");
    for (name, field) in [
        ("new\nline.png", format!("\"{d}/new\nline.png\",")),
        ("quote", format!("\"{d}/quo\"\"te,comma.png\",")),
        ("non-UTF-8", format!("{d}/bad\\xff\\xfe.png,")),
    ] {
        assert!(csv.contains(&field), "{name}: {csv}");
    }
    // Table: every image takes exactly its two lines; control characters are escaped.
    let table = run("table");
    assert_eq!(table.lines().count(), 2 * names.len(), "{table}");
    assert!(
        table.contains("new\\nline.png") && table.contains("tab\\there.png"),
        "{table}"
    );
}

#[test]
fn bench_gemm_times_every_linear_shape_of_the_model() {
    let (_, config) = tiny();
    let out = beitv2(
        &[
            "bench",
            "--gemm",
            "--arch",
            config.to_str().unwrap(),
            "--batch-size",
            "1",
            "2",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records = json_lines(&text(&out.stdout));
    // The fixture: embed 16, MLP 64, 4×4 patches + the class token.
    let shapes = [
        ("qkv", 48, 16),
        ("proj", 16, 16),
        ("fc1", 64, 16),
        ("fc2", 16, 64),
    ];
    for batch in [1, 2] {
        for (name, n, k) in shapes {
            let rows: Vec<&serde_json::Value> = records
                .iter()
                .filter(|r| r["shape"] == name && r["rows"] == 17 * batch)
                .collect();
            assert!(
                rows.iter().any(|r| r["kernel"] == "gemm-crate"),
                "{name} at batch {batch}: {rows:?}"
            );
            for r in rows {
                assert_eq!((r["out"].as_u64(), r["in"].as_u64()), (Some(n), Some(k)));
                let (best, median) = (
                    r["best_gflops"].as_f64().unwrap(),
                    r["median_gflops"].as_f64().unwrap(),
                );
                assert!(median > 0.0 && best >= median && best.is_finite(), "{r}");
            }
        }
    }
}
