//! Expanding the command line's PATH arguments (files, folders, globs) into
//! image files, and the class-name labels.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Extensions picked up when walking a folder (explicit files are always taken).
const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif",
];

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image_name(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Files given explicitly, every image file under folders (recursively, sorted),
/// and glob matches. A path that does not exist and matches nothing is an error.
pub fn expand_paths(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            walk(a, &mut out)?;
        } else if a.exists() {
            out.push(a.clone());
        } else {
            let pattern = a.to_string_lossy();
            let matches: Vec<PathBuf> = glob::glob(&pattern)
                .with_context(|| format!("'{pattern}' is neither a file nor a valid glob"))?
                .filter_map(|m| m.ok())
                .filter(|p| p.is_file())
                .collect();
            if matches.is_empty() {
                bail!("{}: no such file, folder or matching glob", a.display());
            }
            out.extend(matches);
        }
    }
    if out.is_empty() {
        bail!("no images found in the given paths");
    }
    // Overlapping arguments (`dir dir/*.jpg`) name a file once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

/// ImageNet-1k class names (timm's `imagenet_synset_to_lemma.txt`, in class order).
const IMAGENET_CLASSES: &str = include_str!("../../assets/imagenet_classes.txt");

/// Class names: from a file (one per line), the bundled ImageNet-1k names for a
/// 1000-class model, or `class_N` otherwise.
pub fn labels(path: Option<&Path>, num_classes: usize) -> Result<Vec<String>> {
    let names: Vec<String> = match path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read labels file {}", p.display()))?
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect(),
        None if num_classes == 1000 => IMAGENET_CLASSES.lines().map(str::to_string).collect(),
        None => (0..num_classes).map(|i| format!("class_{i}")).collect(),
    };
    if names.len() != num_classes {
        bail!(
            "{} has {} labels but the model has {num_classes} classes",
            path.map(|p| p.display().to_string())
                .unwrap_or_else(|| "the bundled label list".into()),
            names.len()
        );
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_labels_are_imagenet_order() {
        let l = labels(None, 1000).unwrap();
        assert_eq!(l[281], "tabby, tabby cat");
        assert_eq!(labels(None, 3).unwrap(), ["class_0", "class_1", "class_2"]);
    }

    #[test]
    fn missing_path_is_an_error_naming_it() {
        let err = expand_paths(&[PathBuf::from("/nonexistent/x.png")]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.png"));
    }
}
