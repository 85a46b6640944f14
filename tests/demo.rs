//! `beitv2 demo` end to end at its smoke size on synthetic Fashion-MNIST and
//! digits files: every stage runs and leaves loadable, consistent artifacts,
//! a re-run skips finished stages, and the report's numbers are the metrics
//! files' numbers.

use std::io::Write;
use std::path::Path;
use std::process::Command;

fn gz(path: &Path, bytes: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap();
}

/// IDX files of `n` 28×28 images: class `c` is a bright bar at row 2c.
fn write_idx(dir: &Path, prefix: &str, n: usize) {
    let mut img = vec![0, 0, 8, 3];
    img.extend((n as u32).to_be_bytes());
    img.extend(28u32.to_be_bytes());
    img.extend(28u32.to_be_bytes());
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((n as u32).to_be_bytes());
    for i in 0..n {
        let c = i % 10;
        for y in 0..28 {
            for x in 0..28 {
                let on = (2 * c..2 * c + 6).contains(&y) && x > 3 && x < 24;
                img.push(if on {
                    230
                } else {
                    ((x * 7 + y * 3 + i) % 40) as u8
                });
            }
        }
        lab.push(c as u8);
    }
    gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), &img);
    gz(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), &lab);
}

/// 1,600 rows of scikit-learn's digits format: 64 values in 0..=16, then the digit.
fn write_digits(path: &Path) {
    let mut text = String::new();
    for i in 0..1600usize {
        let d = i % 10;
        let px: Vec<String> = (0..64)
            .map(|p| (if p / 8 == d % 8 { 16 } else { (p + i) % 5 }).to_string())
            .collect();
        text.push_str(&format!("{},{d}\n", px.join(",")));
    }
    gz(path, text.as_bytes());
}

/// Synthetic Fashion-MNIST (200 train, 60 test) and digits files under `tmp`.
fn synthetic_data(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = tmp.join("fmnist");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", 200);
    write_idx(&data, "t10k", 60);
    let digits = tmp.join("digits.csv.gz");
    write_digits(&digits);
    (data, digits)
}

fn demo_cmd(data: &Path, digits: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_beitv2"));
    c.args(["demo", "--profile", "smoke", "--data"])
        .arg(data)
        .arg("--digits")
        .arg(digits)
        .arg("--out")
        .arg(out);
    c
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn smoke_pipeline_runs_every_stage_and_reports_the_logged_numbers() {
    let tmp = std::env::temp_dir().join(format!("beitv2-demo-{}", std::process::id()));
    let (data, digits) = synthetic_data(&tmp);
    let out = tmp.join("out");
    let demo = || demo_cmd(&data, &digits, &out).output().unwrap();
    let o = demo();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");

    let report = json(&out.join("report.json"));
    // The report's numbers are the stages' metrics files' numbers.
    for row in report["results"].as_array().unwrap() {
        let stage = row["result"]["stage"].as_str().unwrap();
        let metrics = std::fs::read_to_string(out.join(stage).join("metrics.jsonl")).unwrap();
        let last_val: serde_json::Value = metrics
            .lines()
            .rev()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["kind"] == "val")
            .unwrap();
        assert_eq!(row["result"]["top1"], last_val["top1"], "{stage}");
    }
    // A step budget shorter than an epoch stops there (100%: 3 steps).
    let ft_steps = std::fs::read_to_string(out.join("finetune-pretrained-100pct/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\""))
        .count();
    assert_eq!(ft_steps, 3);
    // The fine-tuned checkpoint evaluates to the accuracy it logged.
    let ft = out.join("finetune-pretrained-100pct");
    let e = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(["eval", "--weights"])
        .arg(ft.join("model-last.safetensors"))
        .arg("--data")
        .arg(format!("fashion-mnist:test:{}", data.display()))
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let got: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    let logged = json(&ft.join("stage.json"));
    assert!((got["top1"].as_f64().unwrap() - logged["top1"].as_f64().unwrap()).abs() < 1e-9);
    // Token grids of the right shape with ids in range.
    let t = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(["tokenize", "--tokenizer"])
        .arg(out.join("tokenizer/tokenizer-last.safetensors"))
        .arg(out.join("token-maps.png"))
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let line: serde_json::Value = serde_json::from_slice(&t.stdout).unwrap();
    let rows = line["tokens"].as_array().unwrap();
    assert_eq!(rows.len(), 7);
    for r in rows {
        assert_eq!(r.as_array().unwrap().len(), 7);
        assert!(
            r.as_array()
                .unwrap()
                .iter()
                .all(|v| v.as_u64().unwrap() < 512)
        );
    }
    for f in [
        "report.md",
        "codebook-usage.png",
        "token-maps.png",
        "pretrain/curves.png",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let usage = &report["test_codebook_usage"];
    assert!(usage["used_codes"].as_u64().unwrap() >= 1);

    // A second run skips every finished stage.
    let again = demo();
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success(), "{err}");
    assert!(err.contains("[pretrain] done earlier: skipped"), "{err}");
    assert!(!err.contains("[pretrain] running"), "{err}");

    // Killed after a run's final checkpoint but before the demo recorded its
    // stage: the re-run takes the logged result instead of failing.
    let stages = ["finetune-scratch-10pct", "linprobe-scratch"];
    let before: Vec<_> = stages
        .iter()
        .map(|s| json(&out.join(s).join("stage.json"))["top1"].clone())
        .collect();
    for s in stages {
        std::fs::remove_file(out.join(s).join("stage.json")).unwrap();
    }
    let third = demo();
    let err = String::from_utf8_lossy(&third.stderr).to_string();
    assert!(third.status.success(), "{err}");
    for (s, want) in stages.iter().zip(&before) {
        assert_eq!(&json(&out.join(s).join("stage.json"))["top1"], want, "{s}");
    }
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
fn missing_data_names_the_package_and_the_flag() {
    let o = Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args([
            "demo",
            "--no-install",
            "--data",
            "/nonexistent/fmnist",
            "--out",
        ])
        .arg(std::env::temp_dir().join("beitv2-demo-missing"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("dataset-fashion-mnist")
            && err.contains("--data")
            && err.contains("train-images-idx3-ubyte"),
        "{err}"
    );
}

#[test]
fn a_killed_demo_resumes_at_the_stage_where_it_stopped() {
    let tmp = std::env::temp_dir().join(format!("beitv2-demo-kill-{}", std::process::id()));
    let (data, digits) = synthetic_data(&tmp);
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    let run_a = demo_cmd(&data, &digits, &a).output().unwrap();
    assert!(
        run_a.status.success(),
        "{}",
        String::from_utf8_lossy(&run_a.stderr)
    );

    // SIGKILL as soon as the tokenizer stage has finished.
    let mut child = demo_cmd(&data, &digits, &b)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = b.join("tokenizer/stage.json");
    let t0 = std::time::Instant::now();
    while !marker.exists() && t0.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !b.join("report.json").exists(),
        "the demo finished before the kill"
    );
    let run_b = demo_cmd(&data, &digits, &b).output().unwrap();
    let err = String::from_utf8_lossy(&run_b.stderr);
    assert!(run_b.status.success(), "{err}");
    assert!(err.contains("[teacher] done earlier: skipped"), "{err}");
    assert!(err.contains("[tokenizer] done earlier: skipped"), "{err}");
    // Same results as the uninterrupted run.
    let top1 = |dir: &Path| -> Vec<serde_json::Value> {
        json(&dir.join("report.json"))["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["result"]["top1"].clone())
            .collect()
    };
    assert_eq!(top1(&a), top1(&b));
    assert_eq!(
        json(&a.join("pretrain/stage.json"))["mim_acc_main"],
        json(&b.join("pretrain/stage.json"))["mim_acc_main"]
    );
    std::fs::remove_dir_all(tmp).unwrap();
}
