//! Small shared helpers.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is
/// written and synced, then renamed over the target, so a reader (or a crash)
/// never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// [`write_atomic`] for content produced piece by piece (`fill` writes it),
/// so that a large file need not be held in memory first.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        fill(&mut w).with_context(|| format!("cannot write {}", tmp.display()))?;
        let f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        // Persist the rename itself; best effort (not every filesystem allows it).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A path as text for result files: valid UTF-8 as it is, and each byte of
/// a name that is not UTF-8 as `\xNN` (instead of U+FFFD, so that two such
/// names stay apart and the bytes can be recovered).
pub fn path_text(path: &Path) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let mut out = String::new();
        for chunk in path.as_os_str().as_bytes().utf8_chunks() {
            out.push_str(chunk.valid());
            for b in chunk.invalid() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out
    }
    #[cfg(not(unix))]
    {
        path.to_string_lossy().into_owned()
    }
}

/// `text` with its control characters escaped (`\n`, `\t`, `\u{1b}`), for
/// one-line-per-item output such as tables, where a newline in a file name
/// would otherwise start a line of its own.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// Exclusive use of an output folder for the life of this value: a second
/// run started on the same folder is refused instead of interleaving its
/// checkpoints and logs with the first. The lock is the OS's advisory lock on
/// `DIR/.beitv2.lock`, which the OS drops when the process ends in any way, so
/// a killed or crashed run never leaves the folder locked.
#[derive(Debug)]
pub struct OutputLock {
    _file: std::fs::File,
}

impl OutputLock {
    pub const FILE: &str = ".beitv2.lock";

    /// Creates `dir` if needed and takes its lock, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(Self::FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                anyhow::bail!(
                    "another beitv2 run{} is using {}: wait for it to finish or choose another \
                     output folder",
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    },
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // The holder's pid, for the message above (the lock itself is what counts).
        file.set_len(0)
            .and_then(|()| write!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_text_keeps_non_utf8_bytes_apart_and_controls_are_escaped() {
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let a = Path::new(std::ffi::OsStr::from_bytes(b"bad\xff\xfe.png"));
            let b = Path::new(std::ffi::OsStr::from_bytes(b"bad\xfe\xff.png"));
            assert_eq!(path_text(a), "bad\\xff\\xfe.png");
            assert_ne!(path_text(a), path_text(b));
        }
        assert_eq!(path_text(Path::new("caf\u{e9}.png")), "caf\u{e9}.png");
        assert_eq!(
            escape_controls("new\nline\t\u{1b}.png"),
            "new\\nline\\t\\u{1b}.png"
        );
        assert_eq!(escape_controls("quo\"te,comma"), "quo\"te,comma");
    }

    #[test]
    fn an_output_folder_is_locked_until_its_holder_is_dropped() {
        let dir = std::env::temp_dir().join(format!("beitv2-lock-{}", std::process::id()));
        let first = OutputLock::acquire(&dir).unwrap();
        let e = OutputLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            e.contains("another beitv2 run") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(first);
        OutputLock::acquire(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
