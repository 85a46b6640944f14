//! Datasets (image folders, label files, IDX/Fashion-MNIST) and the batch
//! loader: listing order, error messages, and batch determinism.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use beitv2::data::dataset::{Dataset, FASHION_MNIST_CLASSES, Sample, Split};
use beitv2::data::loader::{Batch, Loader, LoaderConfig, SampleTransform, sample_rng};
use beitv2::data::{EvalTransform, RgbImage};
use candle_core::Device;
use flate2::Compression;
use flate2::write::GzEncoder;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("beitv2-datasets-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/datasets")
        .join(name)
}

/// Writes a `w`×`h` PNG filled with `rgb`, creating parent folders.
fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

fn touch(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"not an image").unwrap();
}

/// Paths of a path-backed dataset relative to `root`, as strings.
fn relative(ds: &Dataset, root: &Path) -> Vec<String> {
    ds.samples
        .iter()
        .map(|s| match s {
            Sample::Path(p) => p.strip_prefix(root).unwrap().display().to_string(),
            Sample::Grey { .. } => panic!("expected paths"),
        })
        .collect()
}

fn err_string(e: anyhow::Error) -> String {
    format!("{e:#}")
}

// ---------------------------------------------------------------- folders

/// Classes in sorted order (upper case first), root-level files ignored,
/// files in `sorted(os.walk())` order: `sub-x/` before `sub/deeper/`.
#[test]
fn image_folder_orders_classes_and_files_like_torchvision() {
    let tmp = TempDir::new("folder");
    let root = tmp.path();
    for f in [
        "a/z.png",
        "a/UPPER.PNG",
        "a/sub/y.jpg",
        "a/sub-x/w.webp",
        "a/sub/deeper/v.bmp",
        "b/b1.png",
        "A/only.jpeg",
        "stray.png",
    ] {
        touch(&root.join(f));
    }
    touch(&root.join("a/notes.txt"));
    touch(&root.join("b/anim.gif"));

    let ds = Dataset::image_folder(root).unwrap();
    assert_eq!(ds.classes, ["A", "a", "b"]);
    assert_eq!(
        relative(&ds, root),
        [
            "A/only.jpeg",
            "a/UPPER.PNG",
            "a/z.png",
            "a/sub/y.jpg",
            "a/sub-x/w.webp",
            "a/sub/deeper/v.bmp",
            "b/b1.png",
        ]
    );
    assert_eq!(ds.labels.as_deref(), Some(&[0, 1, 1, 1, 1, 1, 2][..]));
    assert_eq!(ds.len(), 7);
    assert!(!ds.is_empty());

    let all = Dataset::unlabelled(root).unwrap();
    assert_eq!(all.labels, None);
    assert!(all.classes.is_empty());
    assert_eq!(
        relative(&all, root),
        [
            "stray.png",
            "A/only.jpeg",
            "a/UPPER.PNG",
            "a/z.png",
            "a/sub/y.jpg",
            "a/sub-x/w.webp",
            "a/sub/deeper/v.bmp",
            "b/b1.png",
        ]
    );
}

/// Symlinked folders are followed (as `os.walk(followlinks=True)` does),
/// except back into an ancestor, which would recurse forever.
#[cfg(unix)]
#[test]
fn image_folder_follows_symlinks_without_cycling() {
    use std::os::unix::fs::symlink;
    let tmp = TempDir::new("symlinks");
    let root = tmp.path();
    touch(&root.join("real/x.png"));
    symlink(root.join("real"), root.join("link")).unwrap();
    symlink(root.join("real"), root.join("real/loop")).unwrap();
    let ds = Dataset::image_folder(root).unwrap();
    assert_eq!(ds.classes, ["link", "real"]);
    assert_eq!(relative(&ds, root), ["link/x.png", "real/x.png"]);
}

#[test]
fn image_folder_errors_name_the_root_and_empty_classes() {
    let tmp = TempDir::new("folder-errors");
    let root = tmp.path();
    let e = err_string(Dataset::image_folder(&root.join("missing")).unwrap_err());
    assert!(
        e.contains("missing") && e.contains("not a directory"),
        "{e}"
    );

    touch(&root.join("loose.png"));
    let e = err_string(Dataset::image_folder(root).unwrap_err());
    assert!(
        e.contains("no class folders") && e.contains(&root.display().to_string()),
        "{e}"
    );

    touch(&root.join("cat/c.png"));
    touch(&root.join("dog/readme.txt"));
    let e = err_string(Dataset::image_folder(root).unwrap_err());
    assert!(e.contains("class folder(s) dog"), "{e}");

    let empty = root.join("empty");
    fs::create_dir_all(empty.join("nested")).unwrap();
    let e = err_string(Dataset::unlabelled(&empty).unwrap_err());
    assert!(e.contains("no images") && e.contains("empty"), "{e}");
}

// ---------------------------------------------------------------- label files

#[test]
fn labelled_list_parses_mmpretrain_annotations() {
    let tmp = TempDir::new("list");
    let root = tmp.path().join("val");
    for f in ["x1.png", "with space.png", "d/x3.jpg"] {
        touch(&root.join(f));
    }
    let list = tmp.path().join("val.txt");
    fs::write(&list, "x1.png 2\n\nwith space.png 0\r\nd/x3.jpg\t4\n").unwrap();

    let ds = Dataset::labelled_list(&root, &list, None).unwrap();
    assert_eq!(
        relative(&ds, &root),
        ["x1.png", "with space.png", "d/x3.jpg"]
    );
    assert_eq!(ds.labels.as_deref(), Some(&[2, 0, 4][..]));
    assert_eq!(
        ds.classes,
        ["class_0", "class_1", "class_2", "class_3", "class_4"]
    );

    let classes = tmp.path().join("classes.txt");
    fs::write(&classes, "zero\none\ntwo\nthree\nfour\n\n").unwrap();
    let named = Dataset::labelled_list(&root, &list, Some(&classes)).unwrap();
    assert_eq!(named.classes, ["zero", "one", "two", "three", "four"]);
    assert_eq!(named.labels, ds.labels);
}

#[test]
fn labelled_list_errors_name_file_and_line() {
    let tmp = TempDir::new("list-errors");
    let root = tmp.path();
    touch(&root.join("a.png"));
    let list = root.join("meta.txt");
    let check = |text: &str, classes: Option<&Path>, expect: &[&str]| {
        fs::write(&list, text).unwrap();
        let e = err_string(Dataset::labelled_list(root, &list, classes).unwrap_err());
        for part in expect {
            assert!(e.contains(part), "{e:?} lacks {part:?}");
        }
    };
    check(
        "a.png 1\n\nb.png\n",
        None,
        &["meta.txt:3", "expected `<path> <label>`"],
    );
    check("a.png one\n", None, &["meta.txt:1", "\"one\""]);
    check("a.png -1\n", None, &["meta.txt:1", "\"-1\""]);
    check(
        "a.png 0\nmissing.png 1\n",
        None,
        &["meta.txt:2", "missing.png", "does not exist"],
    );
    check("\n\n", None, &["lists no images"]);

    let classes = root.join("classes.txt");
    fs::write(&classes, "cat\ndog\n").unwrap();
    check(
        "a.png 1\na.png 2\n",
        Some(&classes),
        &["meta.txt:2", "label 2", "2 classes"],
    );
    check("a.png 0\n", Some(&root.join("nope.txt")), &["nope.txt"]);
}

#[test]
fn check_labels_names_sample_and_label() {
    let tmp = TempDir::new("check-labels");
    let root = tmp.path();
    touch(&root.join("a.png"));
    touch(&root.join("b.png"));
    let list = root.join("l.txt");
    fs::write(&list, "a.png 1\nb.png 7\n").unwrap();
    let ds = Dataset::labelled_list(root, &list, None).unwrap();
    ds.check_labels(8).unwrap();
    let e = err_string(ds.check_labels(5).unwrap_err());
    assert!(
        e.contains("b.png") && e.contains("label 7") && e.contains("5 classes"),
        "{e}"
    );

    let sub = ds.subset(&[1, 0, 1]);
    assert_eq!(sub.labels.as_deref(), Some(&[7, 1, 7][..]));
    assert_eq!(sub.samples[0], ds.samples[1]);
    assert_eq!(sub.classes, ds.classes);

    let unlabelled = Dataset::unlabelled(root).unwrap();
    unlabelled.check_labels(1).unwrap();
}

// ---------------------------------------------------------------- IDX

/// IDX header + payload.
fn idx_bytes(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn write_maybe_gz(path: &Path, bytes: &[u8], gz: bool) {
    if gz {
        let file = fs::File::create(path.with_extension("gz")).unwrap();
        let mut enc = GzEncoder::new(file, Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    } else {
        fs::write(path, bytes).unwrap();
    }
}

/// Three 2×3 grey images (pixel value = 10 * image + position) and labels.
fn write_tiny_idx(dir: &Path, prefix: &str, gz: bool, labels: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    let n = labels.len() as u32;
    let pixels: Vec<u8> = (0..n as u8)
        .flat_map(|i| (0..6).map(move |p| 10 * i + p))
        .collect();
    write_maybe_gz(
        &dir.join(format!("{prefix}-images-idx3-ubyte")),
        &idx_bytes(2051, &[n, 2, 3], &pixels),
        gz,
    );
    write_maybe_gz(
        &dir.join(format!("{prefix}-labels-idx1-ubyte")),
        &idx_bytes(2049, &[n], labels),
        gz,
    );
}

#[test]
fn fashion_mnist_reads_raw_and_gzipped_idx() {
    let tmp = TempDir::new("idx");
    for gz in [false, true] {
        let dir = tmp.path().join(if gz { "gz" } else { "raw" });
        write_tiny_idx(&dir, "train", gz, &[9, 0, 3]);
        write_tiny_idx(&dir, "t10k", gz, &[1]);

        let train = Dataset::fashion_mnist(&dir, Split::Train).unwrap();
        assert_eq!(train.name, "fashion-mnist/train");
        assert_eq!(train.len(), 3);
        assert_eq!(train.labels.as_deref(), Some(&[9, 0, 3][..]));
        assert_eq!(train.classes, FASHION_MNIST_CLASSES);
        assert_eq!(
            train.samples[1],
            Sample::Grey {
                pixels: vec![10, 11, 12, 13, 14, 15],
                width: 3,
                height: 2
            }
        );
        let img = train.load_rgb(2).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(&img.data[..9], &[20, 20, 20, 21, 21, 21, 22, 22, 22]);
        assert_eq!(img.data.len(), 18);
        assert_eq!(train.sample_name(2), "fashion-mnist/train[2]");

        let test = Dataset::fashion_mnist(&dir, Split::Test).unwrap();
        assert_eq!(test.name, "fashion-mnist/test");
        assert_eq!(test.len(), 1);
    }
}

#[test]
fn fashion_mnist_validates_idx_files() {
    let tmp = TempDir::new("idx-errors");
    let dir = tmp.path();
    let images = dir.join("train-images-idx3-ubyte");
    let labels = dir.join("train-labels-idx1-ubyte");
    let expect_err = |parts: &[&str]| {
        let e = err_string(Dataset::fashion_mnist(dir, Split::Train).unwrap_err());
        for part in parts {
            assert!(e.contains(part), "{e:?} lacks {part:?}");
        }
    };

    expect_err(&["neither train-images-idx3-ubyte nor train-images-idx3-ubyte.gz"]);

    write_tiny_idx(dir, "train", false, &[1, 2, 3]);
    fs::write(&images, idx_bytes(2049, &[3, 2, 3], &[0; 18])).unwrap();
    expect_err(&[
        "train-images-idx3-ubyte",
        "magic number 2049, expected 2051",
    ]);

    write_tiny_idx(dir, "train", false, &[1, 2, 3]);
    fs::write(&labels, idx_bytes(2051, &[3], &[1, 2, 3])).unwrap();
    expect_err(&[
        "train-labels-idx1-ubyte",
        "magic number 2051, expected 2049",
    ]);

    write_tiny_idx(dir, "train", false, &[1, 2]);
    fs::write(&images, idx_bytes(2051, &[3, 2, 3], &[0; 18])).unwrap();
    expect_err(&["holds 3 images", "holds 2 labels"]);

    fs::write(&images, idx_bytes(2051, &[2, 2, 3], &[0; 11])).unwrap();
    expect_err(&["11 data bytes", "expected 12"]);

    fs::write(&images, [0, 0, 8]).unwrap();
    expect_err(&["too short for an IDX header"]);

    write_tiny_idx(dir, "train", false, &[1, 10]);
    expect_err(&["label 10 of item 1"]);

    fs::remove_file(&images).unwrap();
    fs::write(images.with_extension("gz"), [0x1f, 0x8b, 1, 2, 3]).unwrap();
    expect_err(&["cannot gunzip", "train-images-idx3-ubyte.gz"]);
}

/// The real data from Debian's `dataset-fashion-mnist`:
/// `cargo test --test datasets -- --ignored`.
#[test]
#[ignore = "needs Debian's dataset-fashion-mnist package"]
fn real_fashion_mnist() {
    let dir = Dataset::default_fashion_mnist_dir();
    for (split, n) in [(Split::Train, 60_000), (Split::Test, 10_000)] {
        let ds = Dataset::fashion_mnist(&dir, split).unwrap();
        assert_eq!(ds.len(), n);
        ds.check_labels(10).unwrap();
        let mut counts = [0usize; 10];
        for &l in ds.labels.as_ref().unwrap() {
            counts[l] += 1;
        }
        assert_eq!(counts, [n / 10; 10], "Fashion-MNIST is balanced");
        let img = ds.load_rgb(n - 1).unwrap();
        assert_eq!(
            (img.width, img.height, img.data.len()),
            (28, 28, 28 * 28 * 3)
        );
    }
}

// ---------------------------------------------------------------- loader

/// A transform that uses its RNG: each output value is a pixel value plus
/// noise, on a fixed 2×2 output.
struct Noisy;

impl SampleTransform for Noisy {
    fn apply(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<f32>> {
        Ok((0..12)
            .map(|k| f32::from(img.data[k % img.data.len()]) + rng.random::<f32>())
            .collect())
    }

    fn output_hw(&self) -> (usize, usize) {
        (2, 2)
    }
}

/// `n` in-memory 1×1 grey samples with value `i` and label `i % 3`.
fn grey_dataset(n: usize) -> Arc<Dataset> {
    Arc::new(Dataset {
        name: "grey".into(),
        samples: (0..n)
            .map(|i| Sample::Grey {
                pixels: vec![i as u8],
                width: 1,
                height: 1,
            })
            .collect(),
        labels: Some((0..n).map(|i| i % 3).collect()),
        classes: vec!["a".into(), "b".into(), "c".into()],
    })
}

fn config(batch_size: usize, workers: usize, prefetch: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        shuffle: true,
        drop_last: false,
        seed: 42,
        workers,
        prefetch,
    }
}

/// What must be identical between two runs.
fn content(b: &Batch) -> (Vec<u32>, Vec<usize>, Vec<usize>, usize) {
    let bits = b.images.iter().map(|v| v.to_bits()).collect();
    (bits, b.labels.clone(), b.indices.clone(), b.failures.len())
}

#[test]
fn batches_are_identical_for_any_workers_prefetch_and_start() {
    let ds = grey_dataset(23);
    let run = |workers, prefetch, epoch, start| {
        let loader =
            Loader::new(ds.clone(), Arc::new(Noisy), config(4, workers, prefetch)).unwrap();
        loader
            .iter_epoch(epoch, start)
            .map(|b| content(&b))
            .collect::<Vec<_>>()
    };
    let reference = run(1, 1, 3, 0);
    assert_eq!(reference.len(), 6);
    assert_eq!(run(2, 4, 3, 0), reference);
    assert_eq!(run(3, 0, 3, 0), reference);
    assert_eq!(run(2, 2, 3, 4), reference[4..]);
    assert_eq!(run(1, 3, 3, 5), reference[5..]);
    assert!(run(2, 2, 3, 6).is_empty());
    assert!(run(2, 2, 3, 99).is_empty());

    // Another epoch reshuffles and redraws the noise.
    let other = run(2, 2, 4, 0);
    assert_ne!(other, reference);

    // Each sample's values come from its own RNG: sample 7 in epoch 3.
    let loader = Loader::new(ds.clone(), Arc::new(Noisy), config(4, 1, 1)).unwrap();
    let batch = loader
        .iter_epoch(3, 0)
        .find(|b| b.indices.contains(&7))
        .unwrap();
    let pos = batch.indices.iter().position(|&i| i == 7).unwrap();
    let expected = Noisy
        .apply(&ds.load_rgb(7).unwrap(), &mut sample_rng(42, 3, 7))
        .unwrap();
    assert_eq!(&batch.images[pos * 12..][..12], &expected[..]);
    assert_eq!(batch.labels[pos], 7 % 3);
}

#[test]
fn epoch_order_shuffles_per_epoch_and_covers_everything() {
    let ds = grey_dataset(50);
    let loader = Loader::new(ds.clone(), Arc::new(Noisy), config(8, 2, 2)).unwrap();
    let e0 = loader.epoch_order(0);
    let e1 = loader.epoch_order(1);
    assert_ne!(e0, e1);
    assert_eq!(e0, loader.epoch_order(0));
    let mut sorted = e0.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    let visited: Vec<usize> = loader.iter_epoch(0, 0).flat_map(|b| b.indices).collect();
    assert_eq!(visited, e0);

    let mut cfg = config(8, 2, 2);
    cfg.shuffle = false;
    let ordered = Loader::new(ds, Arc::new(Noisy), cfg).unwrap();
    assert_eq!(ordered.epoch_order(5), (0..50).collect::<Vec<_>>());
}

#[test]
fn drop_last_and_partial_last_batch() {
    let ds = grey_dataset(23);
    let mut cfg = config(4, 2, 2);
    let keep = Loader::new(ds.clone(), Arc::new(Noisy), cfg.clone()).unwrap();
    assert_eq!(keep.batches_per_epoch(), 6);
    let sizes: Vec<usize> = keep.iter_epoch(0, 0).map(|b| b.len()).collect();
    assert_eq!(sizes, [4, 4, 4, 4, 4, 3]);

    cfg.drop_last = true;
    let drop = Loader::new(ds, Arc::new(Noisy), cfg).unwrap();
    assert_eq!(drop.batches_per_epoch(), 5);
    let iter = drop.iter_epoch(0, 1);
    assert_eq!(iter.len(), 4);
    let sizes: Vec<usize> = iter.map(|b| b.len()).collect();
    assert_eq!(sizes, [4; 4]);

    let bad = LoaderConfig {
        batch_size: 0,
        ..config(4, 1, 1)
    };
    assert!(Loader::new(grey_dataset(1), Arc::new(Noisy), bad).is_err());
}

#[test]
fn failed_samples_are_reported_and_the_rest_kept() {
    let tmp = TempDir::new("failures");
    let root = tmp.path();
    write_png(&root.join("cat/0.png"), 5, 4, [200, 0, 0]);
    fs::copy(fixture("truncated.png"), root.join("cat/1.png")).unwrap();
    write_png(&root.join("dog/2.png"), 3, 6, [0, 0, 200]);
    touch(&root.join("dog/3.png"));
    let ds = Arc::new(Dataset::image_folder(root).unwrap());
    let t = EvalTransform::from_crop_pct((4, 4), 1.0, [0.0; 3], [1.0; 3]);

    let mut cfg = config(4, 2, 1);
    cfg.shuffle = false;
    let loader = Loader::new(ds.clone(), Arc::new(t.clone()), cfg).unwrap();
    let batches: Vec<Batch> = loader.iter_epoch(0, 0).collect();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.indices, [0, 2]);
    assert_eq!(b.labels, [0, 1]);
    assert_eq!(b.images.len(), 2 * 3 * 4 * 4);
    let first = t.preprocess(&ds.load_rgb(0).unwrap()).unwrap();
    assert_eq!(&b.images[..48], &first[..]);
    assert_eq!(b.images[48 + 32], 200.0 / 255.0, "second image is blue");
    let names: Vec<&str> = b.failures.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names[0].ends_with("cat/1.png") && names[1].ends_with("dog/3.png"),
        "{names:?}"
    );
    for (name, e) in &b.failures {
        assert!(format!("{e:#}").contains(name.as_str()), "{e:#}");
    }

    // A batch whose only sample fails is empty but still delivered.
    let mut cfg = config(1, 1, 1);
    cfg.shuffle = false;
    let single = Loader::new(ds, Arc::new(t), cfg).unwrap();
    let b = single.iter_epoch(0, 1).next().unwrap();
    assert!(b.is_empty() && b.images.is_empty() && b.labels.is_empty());
    assert_eq!(b.failures.len(), 1);

    // Bad in-memory data and a transform returning the wrong size fail too.
    let mut grey = (*grey_dataset(3)).clone();
    grey.samples[1] = Sample::Grey {
        pixels: vec![1, 2],
        width: 3,
        height: 3,
    };
    let loader = Loader::new(Arc::new(grey), Arc::new(Noisy), config(3, 2, 1)).unwrap();
    let b = loader.iter_epoch(0, 0).next().unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(b.failures[0].0, "grey[1]");
    assert!(format!("{:#}", b.failures[0].1).contains("2 grey pixels for a 3x3 image"));

    struct WrongSize;
    impl SampleTransform for WrongSize {
        fn apply(&self, _: &RgbImage, _: &mut ChaCha8Rng) -> anyhow::Result<Vec<f32>> {
            Ok(vec![0.0; 5])
        }
        fn output_hw(&self) -> (usize, usize) {
            (2, 2)
        }
    }
    let loader = Loader::new(grey_dataset(2), Arc::new(WrongSize), config(2, 1, 1)).unwrap();
    let b = loader.iter_epoch(0, 0).next().unwrap();
    assert!(b.is_empty());
    assert!(format!("{:#}", b.failures[0].1).contains("returned 5 values"));
}

/// Counts calls and is slow, to catch work continuing after a drop.
struct Slow(Arc<AtomicUsize>);

impl SampleTransform for Slow {
    fn apply(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<f32>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        Noisy.apply(img, rng)
    }

    fn output_hw(&self) -> (usize, usize) {
        (2, 2)
    }
}

#[test]
fn dropping_the_iterator_early_stops_all_work() {
    let calls = Arc::new(AtomicUsize::new(0));
    let loader = Loader::new(
        grey_dataset(2000),
        Arc::new(Slow(calls.clone())),
        config(16, 2, 3),
    )
    .unwrap();
    let mut iter = loader.iter_epoch(0, 0);
    assert_eq!(iter.next().unwrap().len(), 16);
    let start = Instant::now();
    drop(iter);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        start.elapsed()
    );
    let after_drop = calls.load(Ordering::SeqCst);
    assert!(after_drop < 2000, "the whole epoch was decoded");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        after_drop,
        "work went on after drop"
    );

    // Dropping before the first batch, and never iterating, is fine too.
    drop(loader.iter_epoch(1, 0));
    drop(loader);
}

#[test]
fn a_panicking_transform_surfaces_in_next() {
    struct Panics;
    impl SampleTransform for Panics {
        fn apply(&self, _: &RgbImage, _: &mut ChaCha8Rng) -> anyhow::Result<Vec<f32>> {
            panic!("transform bug");
        }
        fn output_hw(&self) -> (usize, usize) {
            (1, 1)
        }
    }
    let loader = Loader::new(grey_dataset(4), Arc::new(Panics), config(2, 2, 1)).unwrap();
    let mut iter = loader.iter_epoch(0, 0);
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| iter.next()));
    let payload = panic.expect_err("next must re-raise the panic");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"transform bug"));
    assert!(iter.next().is_none());
}

#[test]
fn batches_convert_to_tensors() {
    let loader = Loader::new(grey_dataset(5), Arc::new(Noisy), config(3, 1, 1)).unwrap();
    let b = loader.iter_epoch(0, 0).next().unwrap();
    let images = b.images_tensor(&Device::Cpu).unwrap();
    assert_eq!(images.dims(), &[3, 3, 2, 2]);
    let labels = b.labels_tensor(&Device::Cpu).unwrap();
    let expected: Vec<u32> = b.indices.iter().map(|&i| (i % 3) as u32).collect();
    assert_eq!(labels.to_vec1::<u32>().unwrap(), expected);

    let mut unlabelled = (*grey_dataset(2)).clone();
    unlabelled.labels = None;
    let loader = Loader::new(Arc::new(unlabelled), Arc::new(Noisy), config(2, 1, 1)).unwrap();
    let b = loader.iter_epoch(0, 0).next().unwrap();
    assert!(b.labels.is_empty());
    assert!(b.labels_tensor(&Device::Cpu).is_err());
}
