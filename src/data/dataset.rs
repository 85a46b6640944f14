//! Datasets: image folders, label files, Fashion-MNIST.
//!
//! A [`Dataset`] is only an index: a list of [`Sample`]s (paths, or small
//! in-memory grey images) with optional labels. Decoding happens lazily in
//! [`Dataset::load_rgb`], so building a dataset of a million files costs a
//! directory walk and no image reads.
//!
//! Sample order matters beyond tidiness: the loader's shuffles are
//! permutations of sample indices, so the same files listed in the same order
//! as the Python references (torchvision `ImageFolder`, mmpretrain label
//! files) give the same index → file mapping.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use flate2::read::GzDecoder;

use super::decode::{RgbImage, load_rgb};

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively against the end
/// of the file name as torchvision does. Keeping its exact list keeps sample
/// indices identical to `ImageFolder`'s; `.ppm`/`.pgm` files are listed but
/// this crate's decoder cannot read them, so the loader reports them as
/// failures rather than silently dropping them.
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// The ten Fashion-MNIST class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// IDX magic number of an unsigned-byte 3-D array (images).
const IDX_IMAGES_MAGIC: u32 = 2051;
/// IDX magic number of an unsigned-byte 1-D array (labels).
const IDX_LABELS_MAGIC: u32 = 2049;

/// Where one sample's pixels come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sample {
    /// An encoded image file, decoded on demand.
    Path(PathBuf),
    /// An 8-bit grey image held in memory (IDX datasets), rows top to bottom.
    Grey {
        /// `width * height` bytes.
        pixels: Vec<u8>,
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },
}

/// Which half of a dataset that ships a fixed train/test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training split.
    Train,
    /// The held-out test split.
    Test,
}

/// An indexed list of samples with optional labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// Human-readable origin (root folder, label file, or dataset name), used
    /// in messages and in the names of in-memory samples.
    pub name: String,
    /// The samples, in index order.
    pub samples: Vec<Sample>,
    /// One label per sample, or `None` for unlabelled data.
    pub labels: Option<Vec<usize>>,
    /// Class names; label `i` means `classes[i]`. Empty when unlabelled.
    pub classes: Vec<String>,
}

impl Dataset {
    /// torchvision `ImageFolder`: every sub-folder of `root` (symlinks to
    /// folders included) is a class, indexed in sorted name order; its
    /// samples are the files with an [`IMG_EXTENSIONS`] extension anywhere
    /// beneath it, in `sorted(os.walk(class_dir))` order (folders sorted by
    /// full path, files sorted within each folder). Files directly in `root`
    /// are ignored.
    ///
    /// Like torchvision, a class folder without any image is an error: its
    /// index would exist with no sample to learn it from, which is almost
    /// always a broken copy.
    pub fn image_folder(root: &Path) -> anyhow::Result<Self> {
        ensure!(
            root.is_dir(),
            "image folder {} is not a directory",
            root.display()
        );
        let mut class_dirs = Vec::new();
        for entry in read_dir_sorted(root)? {
            if entry.is_dir() {
                class_dirs.push(entry);
            }
        }
        if class_dirs.is_empty() {
            bail!("no class folders in {}", root.display());
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut samples = Vec::new();
        let mut labels = Vec::new();
        let mut empty = Vec::new();
        for (label, dir) in class_dirs.iter().enumerate() {
            let class = file_name_string(dir);
            let files = walk_images(dir)?;
            if files.is_empty() {
                empty.push(class.clone());
            }
            labels.extend(std::iter::repeat_n(label, files.len()));
            samples.extend(files.into_iter().map(Sample::Path));
            classes.push(class);
        }
        if !empty.is_empty() {
            bail!(
                "no images (extensions {}) in class folder(s) {} of {}",
                IMG_EXTENSIONS.join(" "),
                empty.join(", "),
                root.display()
            );
        }
        Ok(Self {
            name: root.display().to_string(),
            samples,
            labels: Some(labels),
            classes,
        })
    }

    /// mmpretrain's `CustomDataset` with an annotation file: each non-blank
    /// line of `list` is `<relative path> <integer label>` (the label is after
    /// the last whitespace, so paths may contain spaces), resolved against
    /// `root`. Every file must exist.
    ///
    /// Class names come from `classes` (one per non-blank line) when given,
    /// and every label must then index into it; otherwise they are
    /// `class_0 ..= class_<max label>`. Errors name `file:line`.
    pub fn labelled_list(root: &Path, list: &Path, classes: Option<&Path>) -> anyhow::Result<Self> {
        let text = fs::read_to_string(list)
            .with_context(|| format!("cannot read label file {}", list.display()))?;
        let class_names = match classes {
            Some(path) => Some(read_class_names(path)?),
            None => None,
        };
        let mut samples = Vec::new();
        let mut labels = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("{}:{}", list.display(), n + 1);
            let (name, label) = parse_label_line(line).with_context(at)?;
            let path = root.join(name);
            if !path.is_file() {
                bail!("{}: image {} does not exist", at(), path.display());
            }
            if let Some(names) = &class_names {
                ensure!(
                    label < names.len(),
                    "{}: label {label} out of range for {} classes",
                    at(),
                    names.len()
                );
            }
            samples.push(Sample::Path(path));
            labels.push(label);
        }
        if samples.is_empty() {
            bail!("label file {} lists no images", list.display());
        }
        let classes = class_names.unwrap_or_else(|| {
            let count = labels.iter().max().map_or(0, |&m| m + 1);
            (0..count).map(|i| format!("class_{i}")).collect()
        });
        Ok(Self {
            name: list.display().to_string(),
            samples,
            labels: Some(labels),
            classes,
        })
    }

    /// Every [`IMG_EXTENSIONS`] file beneath `root`, in the same
    /// `sorted(os.walk(root))` order as [`Self::image_folder`], with no
    /// labels (self-supervised pre-training, feature extraction).
    pub fn unlabelled(root: &Path) -> anyhow::Result<Self> {
        ensure!(
            root.is_dir(),
            "image folder {} is not a directory",
            root.display()
        );
        let files = walk_images(root)?;
        if files.is_empty() {
            bail!(
                "no images (extensions {}) under {}",
                IMG_EXTENSIONS.join(" "),
                root.display()
            );
        }
        Ok(Self {
            name: root.display().to_string(),
            samples: files.into_iter().map(Sample::Path).collect(),
            labels: None,
            classes: Vec::new(),
        })
    }

    /// Fashion-MNIST from its four IDX files in `dir`
    /// (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    /// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), each either raw
    /// or gzipped with a `.gz` suffix. Magic numbers, sizes and counts are
    /// validated; every image is held in memory (47 MB for the train split).
    pub fn fashion_mnist(dir: &Path, split: Split) -> anyhow::Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let images_path = find_idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels_path = find_idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let images = read_idx_images(&images_path)?;
        let labels = read_idx_labels(&labels_path)?;
        ensure!(
            images.count == labels.len(),
            "{} holds {} images but {} holds {} labels",
            images_path.display(),
            images.count,
            labels_path.display(),
            labels.len()
        );
        if let Some(i) = labels
            .iter()
            .position(|&l| l >= FASHION_MNIST_CLASSES.len())
        {
            bail!(
                "{}: label {} of item {i} is not a Fashion-MNIST class (0..10)",
                labels_path.display(),
                labels[i]
            );
        }
        let (width, height) = (images.cols, images.rows);
        let samples = images
            .pixels
            .chunks_exact(width * height)
            .map(|pixels| Sample::Grey {
                pixels: pixels.to_vec(),
                width,
                height,
            })
            .collect();
        Ok(Self {
            name: format!(
                "fashion-mnist/{}",
                match split {
                    Split::Train => "train",
                    Split::Test => "test",
                }
            ),
            samples,
            labels: Some(labels),
            classes: FASHION_MNIST_CLASSES.map(String::from).to_vec(),
        })
    }

    /// scikit-learn's bundled 8×8 digits (`sklearn/datasets/data/digits.csv.gz`:
    /// 1,797 rows of 64 pixel values in 0..=16 and the digit), as 8-bit grey
    /// images (`v · 255 / 16`, rounded). `split`: the first 1,500 rows
    /// (`Train`) or the remaining 297 (`Test`).
    pub fn sklearn_digits(path: &Path, split: Split) -> anyhow::Result<Self> {
        use std::io::Read;
        let file = std::fs::File::open(path).with_context(|| {
            format!(
                "cannot open {} (scikit-learn's digits: `apt-get install python3-sklearn` \
                 or pass the path of digits.csv.gz)",
                path.display()
            )
        })?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {} as gzipped text", path.display()))?;
        let (mut samples, mut labels) = (Vec::new(), Vec::new());
        for (line_no, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let values: Vec<f64> = line
                .split(',')
                .map(|v| v.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{} line {}: not numbers", path.display(), line_no + 1))?;
            ensure!(
                values.len() == 65,
                "{} line {}: {} values, expected 64 pixels and a label",
                path.display(),
                line_no + 1,
                values.len()
            );
            let label = values[64];
            ensure!(
                (0.0..10.0).contains(&label) && label.fract() == 0.0,
                "{} line {}: label {label} is not a digit",
                path.display(),
                line_no + 1
            );
            let pixels = values[..64]
                .iter()
                .map(|&v| (v.clamp(0.0, 16.0) * 255.0 / 16.0).round() as u8)
                .collect();
            samples.push(Sample::Grey {
                pixels,
                width: 8,
                height: 8,
            });
            labels.push(label as usize);
        }
        ensure!(!samples.is_empty(), "{} holds no digits", path.display());
        let cut = 1500.min(samples.len());
        let range = match split {
            Split::Train => 0..cut,
            Split::Test => cut..samples.len(),
        };
        Ok(Self {
            name: format!(
                "sklearn-digits/{}",
                if split == Split::Train {
                    "train"
                } else {
                    "test"
                }
            ),
            samples: samples.drain(range.clone()).collect(),
            labels: Some(labels[range].to_vec()),
            classes: (0..10).map(|d| d.to_string()).collect(),
        })
    }

    /// Where Debian's `python3-sklearn` installs the digits.
    pub fn default_sklearn_digits_path() -> PathBuf {
        PathBuf::from("/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz")
    }

    /// Where Debian's `dataset-fashion-mnist` package installs the gzipped
    /// IDX files (`apt-get install dataset-fashion-mnist`).
    pub fn default_fashion_mnist_dir() -> PathBuf {
        PathBuf::from("/usr/share/datasets/fashion-mnist")
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Label of sample `i`, if the dataset is labelled.
    pub fn label(&self, i: usize) -> Option<usize> {
        self.labels.as_ref().map(|l| l[i])
    }

    /// A name for sample `i` in messages: its path, or `name[i]` for
    /// in-memory samples.
    pub fn sample_name(&self, i: usize) -> String {
        match &self.samples[i] {
            Sample::Path(path) => path.display().to_string(),
            Sample::Grey { .. } => format!("{}[{i}]", self.name),
        }
    }

    /// Decodes sample `i` to RGB. Grey samples are replicated into R, G and B
    /// as Pillow's `convert("RGB")` does; resizing is the transform's job.
    pub fn load_rgb(&self, i: usize) -> anyhow::Result<RgbImage> {
        match &self.samples[i] {
            Sample::Path(path) => load_rgb(path),
            Sample::Grey {
                pixels,
                width,
                height,
            } => {
                ensure!(
                    pixels.len() == width * height,
                    "{}: {} grey pixels for a {width}x{height} image",
                    self.sample_name(i),
                    pixels.len()
                );
                Ok(RgbImage {
                    width: *width,
                    height: *height,
                    data: pixels.iter().flat_map(|&p| [p, p, p]).collect(),
                })
            }
        }
    }

    /// Checks that every label indexes into a `num_classes`-way classifier,
    /// so a mismatched head fails before training rather than inside the
    /// loss. Unlabelled datasets always pass.
    pub fn check_labels(&self, num_classes: usize) -> anyhow::Result<()> {
        let Some(labels) = &self.labels else {
            return Ok(());
        };
        if let Some(i) = labels.iter().position(|&l| l >= num_classes) {
            bail!(
                "sample {} has label {}, out of range for {num_classes} classes",
                self.sample_name(i),
                labels[i]
            );
        }
        Ok(())
    }

    /// The samples at `indices`, in that order (repeats allowed), with the
    /// same classes; for `--limit` runs and train/val splits. In-memory
    /// samples are then named by their index in the subset.
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            name: self.name.clone(),
            samples: indices.iter().map(|&i| self.samples[i].clone()).collect(),
            labels: self
                .labels
                .as_ref()
                .map(|l| indices.iter().map(|&i| l[i]).collect()),
            classes: self.classes.clone(),
        }
    }
}

/// Splits `<path> <label>` at the last whitespace.
fn parse_label_line(line: &str) -> anyhow::Result<(&str, usize)> {
    let Some((name, label)) = line.rsplit_once(char::is_whitespace) else {
        bail!("expected `<path> <label>`, found {line:?}");
    };
    let label = label
        .parse::<usize>()
        .with_context(|| format!("label {label:?} is not a non-negative integer"))?;
    Ok((name.trim_end(), label))
}

/// One class name per non-blank line, trimmed (mmengine's `list_from_file`).
fn read_class_names(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read class file {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    ensure!(!names.is_empty(), "class file {} is empty", path.display());
    Ok(names)
}

fn file_name_string(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn has_image_extension(path: &Path) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    let name = name.to_string_lossy().to_lowercase();
    IMG_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// Entries of `dir`, sorted by name bytes (Python's string order for UTF-8
/// names).
fn read_dir_sorted(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let read = || -> std::io::Result<Vec<OsString>> {
        fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    };
    let mut names = read().with_context(|| format!("cannot list {}", dir.display()))?;
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Image files beneath `root` in `sorted(os.walk(root, followlinks=True))`
/// order: folders ordered by their full path *as a string* (so `a-b/` comes
/// before `a/c/`, unlike a component-wise path sort), then the files of each
/// folder by name. Symlinked folders are followed, except back into one of
/// their own ancestors, which would never end.
fn walk_images(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut folders: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    let mut ancestors = HashSet::new();
    collect_folders(root, &mut ancestors, &mut folders)?;
    folders.sort_by(|a, b| {
        a.0.as_os_str()
            .as_encoded_bytes()
            .cmp(b.0.as_os_str().as_encoded_bytes())
    });
    Ok(folders
        .into_iter()
        .flat_map(|(_, files)| files)
        .filter(|f| has_image_extension(f))
        .collect())
}

/// Depth-first collection of `(folder, sorted files)` pairs.
fn collect_folders(
    dir: &Path,
    ancestors: &mut HashSet<PathBuf>,
    out: &mut Vec<(PathBuf, Vec<PathBuf>)>,
) -> anyhow::Result<()> {
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    if !ancestors.insert(canonical.clone()) {
        return Ok(());
    }
    let (subdirs, files): (Vec<PathBuf>, Vec<PathBuf>) =
        read_dir_sorted(dir)?.into_iter().partition(|p| p.is_dir());
    out.push((dir.to_path_buf(), files));
    for sub in subdirs {
        collect_folders(&sub, ancestors, out)?;
    }
    ancestors.remove(&canonical);
    Ok(())
}

/// `dir/base`, or else `dir/base.gz`.
fn find_idx_file(dir: &Path, base: &str) -> anyhow::Result<PathBuf> {
    let raw = dir.join(base);
    if raw.is_file() {
        return Ok(raw);
    }
    let gz = dir.join(format!("{base}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    bail!(
        "neither {base} nor {base}.gz in {} (Debian's dataset-fashion-mnist package installs them in {})",
        dir.display(),
        Dataset::default_fashion_mnist_dir().display()
    )
}

/// File contents, gunzipped when they start with the gzip magic bytes (so a
/// decompressed file that kept its `.gz` name still works).
fn read_maybe_gzipped(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut out)
        .with_context(|| format!("cannot gunzip {}", path.display()))?;
    Ok(out)
}

/// Big-endian `u32` header fields of an IDX file: `[magic, dims...]`.
fn idx_header<const N: usize>(bytes: &[u8], path: &Path) -> anyhow::Result<[u32; N]> {
    ensure!(
        bytes.len() >= 4 * N,
        "{}: {} bytes, too short for an IDX header",
        path.display(),
        bytes.len()
    );
    Ok(std::array::from_fn(|i| {
        u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    }))
}

fn check_magic(found: u32, expected: u32, what: &str, path: &Path) -> anyhow::Result<()> {
    ensure!(
        found == expected,
        "{}: magic number {found}, expected {expected} (IDX {what})",
        path.display()
    );
    Ok(())
}

fn check_payload(payload: usize, expected: usize, path: &Path) -> anyhow::Result<()> {
    ensure!(
        payload == expected,
        "{}: {payload} data bytes after the header, expected {expected} from its dimensions",
        path.display()
    );
    Ok(())
}

struct IdxImages {
    count: usize,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
}

fn read_idx_images(path: &Path) -> anyhow::Result<IdxImages> {
    let mut bytes = read_maybe_gzipped(path)?;
    let [magic, count, rows, cols] = idx_header::<4>(&bytes, path)?;
    check_magic(magic, IDX_IMAGES_MAGIC, "unsigned-byte images", path)?;
    let (count, rows, cols) = (count as usize, rows as usize, cols as usize);
    ensure!(
        rows > 0 && cols > 0,
        "{}: images of {rows}x{cols} pixels",
        path.display()
    );
    let Some(size) = count.checked_mul(rows).and_then(|n| n.checked_mul(cols)) else {
        bail!(
            "{}: {count} images of {rows}x{cols} pixels is too large",
            path.display()
        );
    };
    check_payload(bytes.len() - 16, size, path)?;
    bytes.drain(..16);
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: bytes,
    })
}

fn read_idx_labels(path: &Path) -> anyhow::Result<Vec<usize>> {
    let bytes = read_maybe_gzipped(path)?;
    let [magic, count] = idx_header::<2>(&bytes, path)?;
    check_magic(magic, IDX_LABELS_MAGIC, "unsigned-byte labels", path)?;
    check_payload(bytes.len() - 8, count as usize, path)?;
    Ok(bytes[8..].iter().map(|&l| usize::from(l)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_lines_split_at_last_whitespace() {
        assert_eq!(parse_label_line("a b.png 3").unwrap(), ("a b.png", 3));
        assert_eq!(parse_label_line("x.jpg\t12").unwrap(), ("x.jpg", 12));
        assert_eq!(parse_label_line("x.jpg  +1").unwrap(), ("x.jpg", 1));
        assert!(parse_label_line("x.jpg").is_err());
        assert!(parse_label_line("x.jpg -1").is_err());
        assert!(parse_label_line("x.jpg one").is_err());
    }

    #[test]
    fn extensions_are_case_insensitive_suffixes() {
        assert!(has_image_extension(Path::new("d/A.JPEG")));
        assert!(has_image_extension(Path::new("d/b.webp")));
        assert!(!has_image_extension(Path::new("d/c.gif")));
        assert!(!has_image_extension(Path::new("d/png")));
    }

    #[test]
    fn idx_header_is_big_endian() {
        let bytes = [0, 0, 8, 3, 0, 0, 0, 2, 9];
        let [magic, count] = idx_header::<2>(&bytes, Path::new("x")).unwrap();
        assert_eq!((magic, count), (IDX_IMAGES_MAGIC, 2));
        assert!(idx_header::<4>(&bytes, Path::new("x")).is_err());
    }
}
