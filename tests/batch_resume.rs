//! Long batch jobs: `classify`, `features` and `tokenize` write as they go,
//! and `--resume` after a SIGKILL at any moment ends with the same bytes as an
//! uninterrupted run (no image redone into a duplicate, none lost).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beitv2-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn beitv2(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_beitv2"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn model_args() -> Vec<String> {
    let d = root().join("tests/fixtures/models/v2_avg");
    vec![
        "--weights".into(),
        d.join("timm.safetensors").display().to_string(),
        "--config".into(),
        d.join("config.json").display().to_string(),
    ]
}

fn tokenizer_args() -> Vec<String> {
    let v = root().join("tests/fixtures/vqkd");
    vec![
        "--tokenizer".into(),
        v.join("photo_unilm.pth").display().to_string(),
        "--config".into(),
        v.join("photo_config.json").display().to_string(),
    ]
}

/// The files a finished run leaves: the output and, for `.npy`, its path list.
fn outputs(out: &Path) -> Vec<PathBuf> {
    let mut v = vec![out.to_path_buf()];
    if out.extension().is_some_and(|e| e == "npy") {
        v.push(out.with_extension("paths.txt"));
    }
    v
}

/// Runs `args -o out` once uninterrupted (the reference), then `trials`
/// times from scratch: two `--resume` runs SIGKILLed at random moments, one
/// `--resume` run to the end; the files must equal the reference's.
fn kill_and_resume(name: &str, args: &[String], ext: &str, default_trials: usize) {
    let dir = temp_dir(name);
    let with_out = |out: &Path, resume: bool| {
        let mut a = args.to_vec();
        a.extend(["-o".into(), out.display().to_string()]);
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let reference = dir.join(format!("reference.{ext}"));
    let t0 = Instant::now();
    let r = beitv2(&with_out(&reference, false));
    let span = t0.elapsed();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let want: Vec<Vec<u8>> = outputs(&reference)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let out = dir.join(format!("out.{ext}"));
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ name.len() as u64;
    let trials = common::kill_trials(default_trials);
    let mut landed = 0;
    for trial in 0..trials {
        for e in std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with("out.") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        for _ in 0..2 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let delay = span.mul_f64((state >> 11) as f64 / (1u64 << 53) as f64);
            let mut child = Command::new(env!("CARGO_BIN_EXE_beitv2"))
                .args(with_out(&out, true))
                .current_dir(root())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(delay);
            landed += child.try_wait().unwrap().is_none() as usize;
            let _ = child.kill(); // SIGKILL on Unix
            child.wait().unwrap();
        }
        let r = beitv2(&with_out(&out, true));
        assert!(
            r.status.success(),
            "{name} trial {trial}: the resumed run failed: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        for (p, w) in outputs(&out).iter().zip(&want) {
            let got = std::fs::read(p).unwrap();
            assert!(
                got == *w,
                "{name} trial {trial}: {} differs from the uninterrupted run ({} vs {} bytes)",
                p.display(),
                got.len(),
                w.len()
            );
        }
        for left in [".partial", ".partial.paths"] {
            let mut p = out.clone().into_os_string();
            p.push(left);
            assert!(!Path::new(&p).exists(), "{name}: {left} left behind");
        }
    }
    eprintln!(
        "{name}: {trials} trials passed, {landed} of {} kills landed in a running process \
         (uninterrupted run {span:?})",
        2 * trials
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn image_folder(name: &str, n: u32) -> PathBuf {
    let d = temp_dir(name);
    common::write_class_folders(&d, n, (40, 40));
    d
}

#[test]
fn classify_resumes_json_and_csv_after_kills() {
    let imgs = image_folder("classify-imgs", 60);
    for (format, ext) in [("json", "jsonl"), ("csv", "csv")] {
        let mut a: Vec<String> = vec!["classify".into()];
        a.extend(model_args());
        a.extend(
            ["--format", format, "--top-k", "3", "--batch-size", "4"]
                .iter()
                .map(|s| s.to_string()),
        );
        a.push(imgs.display().to_string());
        kill_and_resume(&format!("classify-{format}"), &a, ext, 4);
    }
    std::fs::remove_dir_all(imgs).unwrap();
}

#[test]
fn features_resume_npy_and_safetensors_after_kills() {
    let imgs = image_folder("features-imgs", 60);
    for ext in ["npy", "safetensors"] {
        let mut a: Vec<String> = vec!["features".into()];
        a.extend(model_args());
        a.extend(
            ["--kind", "patch", "--batch-size", "4"]
                .iter()
                .map(|s| s.to_string()),
        );
        a.push(imgs.display().to_string());
        kill_and_resume(&format!("features-{ext}"), &a, ext, 4);
    }
    std::fs::remove_dir_all(imgs).unwrap();
}

#[test]
fn tokenize_resumes_json_and_npy_after_kills() {
    let imgs = image_folder("tokenize-imgs", 12);
    for (format, ext) in [("json", "jsonl"), ("npy", "npy")] {
        let mut a: Vec<String> = vec!["tokenize".into()];
        a.extend(tokenizer_args());
        a.extend(
            ["--format", format, "--batch-size", "4"]
                .iter()
                .map(|s| s.to_string()),
        );
        a.push(imgs.display().to_string());
        kill_and_resume(&format!("tokenize-{format}"), &a, ext, 3);
    }
    std::fs::remove_dir_all(imgs).unwrap();
}

/// A torn last record is cut off and redone; an image that failed is tried
/// again; a file that is not this command's output is refused, not cut.
#[test]
fn resume_cuts_a_torn_tail_retries_failures_and_refuses_foreign_files() {
    let dir = temp_dir("torn");
    let photos = root().join("assets/photos");
    let mut base: Vec<String> = vec!["classify".into()];
    base.extend(model_args());
    base.extend(
        ["--format", "json", "--top-k", "2"]
            .iter()
            .map(|s| s.to_string()),
    );
    let run = |out: &Path, extra: &[&Path], resume: bool| {
        let mut a = base.clone();
        a.extend(["-o".into(), out.display().to_string()]);
        if resume {
            a.push("--resume".into());
        }
        a.push(photos.display().to_string());
        a.extend(extra.iter().map(|p| p.display().to_string()));
        beitv2(&a)
    };
    let full = dir.join("full.jsonl");
    assert!(run(&full, &[], false).status.success());
    let want = std::fs::read_to_string(&full).unwrap();
    assert_eq!(want.lines().count(), 4);
    // Cut inside the third line: two results kept, the rest redone.
    let cut = want.match_indices('\n').nth(1).unwrap().0 + 10;
    let torn = dir.join("torn.jsonl");
    std::fs::write(&torn, &want[..cut]).unwrap();
    let r = run(&torn, &[], true);
    assert!(r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("2 of 4 images already done"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read_to_string(&torn).unwrap(), want);
    // A broken image fails, is reported, and is tried again on resume.
    let bad = dir.join("broken.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let r = run(&torn, &[&bad], true);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("1 of 1 images could not be processed"));
    assert_eq!(std::fs::read_to_string(&torn).unwrap(), want);
    // Someone else's file is refused and left as it was.
    let foreign = dir.join("notes.jsonl");
    std::fs::write(&foreign, "{\"note\": 1}\n{\"note\": 2}\n").unwrap();
    let r = run(&foreign, &[], true);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("notes.jsonl line 1 is not a result"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&foreign).unwrap(),
        "{\"note\": 1}\n{\"note\": 2}\n"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Results made with other settings are never mixed in or cut away: another
/// `--top-k` (even in a one-image file) is refused, and so are partial
/// feature files whose recorded settings differ from the run's.
#[test]
fn resume_with_other_settings_is_refused() {
    let dir = temp_dir("settings");
    let photo = root()
        .join("assets/photos/chelsea.png")
        .display()
        .to_string();
    let classify = |out: &Path, format: &str, k: &str, resume: bool| {
        let mut a: Vec<String> = vec!["classify".into()];
        a.extend(model_args());
        a.extend(
            ["--format", format, "--top-k", k, "-o"]
                .iter()
                .map(|s| s.to_string()),
        );
        a.push(out.display().to_string());
        if resume {
            a.push("--resume".into());
        }
        a.push(photo.clone());
        beitv2(&a)
    };
    for (format, ext) in [("json", "jsonl"), ("csv", "csv")] {
        let out = dir.join(format!("one.{ext}"));
        assert!(classify(&out, format, "3", false).status.success());
        let before = std::fs::read(&out).unwrap();
        let r = classify(&out, format, "2", true);
        assert!(
            !r.status.success(),
            "{format}: another --top-k must be refused"
        );
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("is not a result of this command"), "{err}");
        assert_eq!(
            std::fs::read(&out).unwrap(),
            before,
            "{format}: file changed"
        );
    }
    // Partial feature files recorded with other settings (another model and kind).
    let out = dir.join("f.npy");
    let features = |kind: &str| {
        let mut a: Vec<String> = vec!["features".into()];
        a.extend(model_args());
        a.extend(
            ["--kind", kind, "--resume", "-o"]
                .iter()
                .map(|s| s.to_string()),
        );
        a.push(out.display().to_string());
        a.push(photo.clone());
        beitv2(&a)
    };
    let mut a: Vec<String> = vec!["features".into()];
    a.extend(model_args());
    a.extend(["--kind", "cls", "-o"].iter().map(|s| s.to_string()));
    a.push(out.display().to_string());
    a.push(photo.clone());
    assert!(beitv2(&a).status.success());
    // Make it look interrupted: back to its partial form.
    let list = std::fs::read_to_string(out.with_extension("paths.txt")).unwrap();
    let npy = std::fs::read(&out).unwrap();
    let hlen = 10 + u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let mut partial = out.clone().into_os_string();
    partial.push(".partial");
    std::fs::write(&partial, &npy[hlen..]).unwrap();
    let mut paths = partial.clone();
    paths.push(".paths");
    let shape = (npy.len() - hlen) / 4;
    let settings_cls = |kind: &str| {
        serde_json::json!({"dtype": "F32", "shape": [shape], "settings": {
            "model": "?", "kind": kind}})
    };
    std::fs::write(
        &paths,
        format!(
            "{}\n{}\n",
            settings_cls("Cls"),
            serde_json::to_string(list.trim()).unwrap()
        ),
    )
    .unwrap();
    std::fs::remove_file(&out).unwrap();
    let r = features("mean");
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("was started with other settings"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The one kill window a random kill rarely hits: after `finish` removed
/// `OUT.partial.paths` but before `OUT.partial`. `--resume` then finds the
/// output complete and must clear the stray data file, leaving the output as
/// it was.
#[test]
fn resume_after_a_finished_run_removes_a_stray_partial() {
    let dir = temp_dir("stray-partial");
    let imgs = image_folder("stray-partial-imgs", 6);
    for ext in ["npy", "safetensors"] {
        let out = dir.join(format!("out.{ext}"));
        let mut a: Vec<String> = vec!["features".into()];
        a.extend(model_args());
        a.extend(["--kind", "cls", "-o"].iter().map(|s| s.to_string()));
        a.push(out.display().to_string());
        a.push(imgs.display().to_string());
        let r = beitv2(&a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let want = std::fs::read(&out).unwrap();
        let mut stray = out.clone().into_os_string();
        stray.push(".partial");
        std::fs::write(&stray, b"rows of a run killed while it finished").unwrap();
        a.push("--resume".into());
        let r = beitv2(&a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(
            !Path::new(&stray).exists(),
            "{ext}: the stray .partial stayed"
        );
        assert_eq!(std::fs::read(&out).unwrap(), want, "{ext}: output changed");
    }
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(imgs).unwrap();
}
