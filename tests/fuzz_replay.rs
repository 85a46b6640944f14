//! Replays the fuzz corpora (`fuzz/corpus/TARGET`) and every input that once
//! crashed a target (`fuzz/regressions/TARGET`) through the same entry points
//! as the cargo-fuzz targets: each must return, never panic.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", f.display());
            n += 1;
        }
    }
    assert!(n > 0, "no inputs for fuzz target {target}");
    eprintln!("{target}: {n} inputs replayed");
}

#[test]
fn checkpoint_inputs_return() {
    replay("checkpoint", beitv2::fuzz::checkpoint);
}

#[test]
fn pickle_inputs_return() {
    replay("pickle", beitv2::fuzz::pickle);
}

#[test]
fn image_inputs_return() {
    replay("image", beitv2::fuzz::image);
}

#[test]
fn recipe_inputs_return() {
    replay("recipe", beitv2::fuzz::recipe);
}

#[test]
fn shapes_inputs_return() {
    replay("shapes", beitv2::fuzz::shapes);
}
