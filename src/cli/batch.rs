//! Streaming results of the batch commands (`classify`, `features`,
//! `tokenize`). Each batch is written and synced as soon as it is computed,
//! so memory does not grow with the number of images (only the list of paths
//! does, about 100 bytes each), and `--resume` continues an interrupted output
//! without redoing or repeating an image.
//!
//! Text results (JSON lines, CSV) are appended to the output file itself; on
//! resume, a torn last record is cut off. Arrays (safetensors, `.npy`) carry
//! the image count in their header, so they are streamed to `OUT.partial`
//! (the rows, back to back) and `OUT.partial.paths` (a JSON line with the
//! dtype and row shape, then one JSON string per row). A row counts once its
//! path line is synced, and the path line is written only after its data; the
//! final file is built from the two when the run ends.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use serde_json::Value;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The name an image's result is filed under: its path as text.
pub fn key(p: &Path) -> String {
    crate::util::path_text(p)
}

/// The images of `paths` whose results are not in `done`, in order, and a
/// line saying how many were skipped (when any were).
pub fn remaining<'a>(paths: &'a [PathBuf], done: &Done, out: &Path) -> Vec<&'a PathBuf> {
    let todo: Vec<&PathBuf> = paths.iter().filter(|p| !done.contains(&key(p))).collect();
    if !done.keys.is_empty() {
        eprintln!(
            "resuming {}: {} of {} images already done, {} to go",
            out.display(),
            paths.len() - todo.len(),
            paths.len(),
            todo.len()
        );
    }
    todo
}

/// `--resume` on an output that is already finished: nothing to do when it
/// holds every image, else an error (a finished file is not reopened).
pub fn finished_output(out: &Path, done: &Done, todo: usize) -> Result<()> {
    if todo == 0 {
        eprintln!(
            "{} is finished and holds all {} images: nothing to do",
            out.display(),
            done.count()
        );
        return Ok(());
    }
    bail!(
        "{} is finished and lacks {todo} of the given images; --resume continues an \
         interrupted run (its .partial files). Run without --resume to write it anew, \
         or to another file",
        out.display()
    )
}

/// The results an output already holds.
#[derive(Default)]
pub struct Done {
    keys: HashSet<String>,
    /// Keys are stored with control characters escaped (a `.paths.txt` list).
    escaped: bool,
    /// Bytes of a text output that hold complete records (the rest is torn).
    pub len: u64,
}

impl Done {
    pub fn contains(&self, key: &str) -> bool {
        if self.escaped {
            self.keys.contains(&crate::util::escape_controls(key))
        } else {
            self.keys.contains(key)
        }
    }

    pub fn count(&self) -> usize {
        self.keys.len()
    }
}

/// Where text results go: stdout, or a file synced after every batch.
pub enum TextSink {
    Stdout(std::io::Stdout),
    File { file: File, path: PathBuf },
}

impl TextSink {
    /// `path` emptied for a fresh run, or cut to its first `keep` bytes (its
    /// complete records) to resume.
    pub fn file(path: &Path, keep: u64) -> Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.set_len(keep)
            .and_then(|_| file.seek(SeekFrom::End(0)).map(|_| ()))
            .with_context(|| format!("cannot cut {} to its complete records", path.display()))?;
        Ok(Self::File {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Writes one batch's records; a file is synced before this returns.
    pub fn write(&mut self, text: &str) -> Result<()> {
        match self {
            Self::Stdout(s) => {
                let mut l = s.lock();
                l.write_all(text.as_bytes())?;
                l.flush()?;
            }
            Self::File { file, path } => {
                file.write_all(text.as_bytes())
                    .and_then(|_| file.sync_data())
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// Reads `path` record by record for a resume. `record` gets each complete
/// line (without its newline) and says whether it completes a result
/// (`Ok(Some(key))`), belongs to one still open (`Ok(None)`), or cannot be
/// ours (`Err`). Only a last line without its newline is a torn write, and
/// dropped (with the records still open before it); a complete line that
/// is not ours is an error, so no one's file is cut short by mistake.
fn scan_lines(
    path: &Path,
    mut record: impl FnMut(&str) -> Result<Option<String>>,
    multi_line: bool,
) -> Result<Done> {
    let mut done = Done::default();
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut r = BufReader::new(f);
    let (mut offset, mut line_no) = (0u64, 0usize);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // A CSV record runs on while a quoted field is open.
        let mut n = 0;
        loop {
            let got = r
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            n += got;
            let quotes = buf.iter().filter(|&&b| b == b'"').count();
            if got == 0 || !multi_line || quotes % 2 == 0 {
                break;
            }
        }
        if n == 0 || buf.last() != Some(&b'\n') {
            return Ok(done); // end of file, or a torn last line
        }
        line_no += 1;
        let text = std::str::from_utf8(&buf[..buf.len() - 1]);
        let parsed = text
            .map_err(anyhow::Error::from)
            .and_then(|t| record(t.trim_end_matches('\r')));
        match parsed {
            Ok(Some(k)) => {
                done.keys.insert(k);
                done.len = offset + n as u64;
            }
            Ok(None) => {}
            Err(e) => {
                bail!(
                    "{} line {line_no} is not a result of this command ({e:#}); \
                     not resuming over it (run without --resume to start it anew)",
                    path.display()
                );
            }
        }
        offset += n as u64;
    }
}

/// A JSON-lines output: each complete line is one image's result, an object
/// whose "path" names it; `check` refuses results made with other settings.
pub fn json_lines_done(path: &Path, mut check: impl FnMut(&Value) -> Result<()>) -> Result<Done> {
    scan_lines(
        path,
        |line| {
            let v: Value = serde_json::from_str(line)?;
            let key = v["path"].as_str().context("no \"path\"")?.to_string();
            check(&v)?;
            Ok(Some(key))
        },
        false,
    )
}

/// Splits one CSV record (RFC 4180: quoted fields, doubled quotes).
pub fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// A CSV output of `header` then `k` rows per image (path first, rank 1..=k
/// second): an image is done once its k-th row is in.
pub fn csv_done(path: &Path, header: &str, k: usize) -> Result<Done> {
    let mut seen_header = false;
    let mut open: Option<(String, usize)> = None;
    scan_lines(
        path,
        |line| {
            if !seen_header {
                if line != header {
                    bail!("the header is not {header:?}");
                }
                seen_header = true;
                return Ok(None);
            }
            let f = csv_fields(line);
            let rank: usize = f.get(1).and_then(|r| r.parse().ok()).context("no rank")?;
            let expected = open.as_ref().map_or(1, |(_, r)| r + 1);
            if rank != expected || (rank > 1 && open.as_ref().is_some_and(|(p, _)| *p != f[0])) {
                bail!("rank {rank} where {expected} was due (another --top-k?)");
            }
            if rank == k {
                open = None;
                return Ok(Some(f[0].clone()));
            }
            open = Some((f[0].clone(), rank));
            Ok(None)
        },
        true,
    )
}

/// Array results (one tensor per image, all of one dtype and shape) streamed
/// to `OUT.partial`; see the module comment.
pub struct RowSink {
    out: PathBuf,
    data: File,
    list: File,
    layout: Option<(DType, Vec<usize>)>,
    rows: u64,
    /// What made the rows (model, kind of feature, ...): a resume with
    /// other settings is refused instead of mixing two kinds of result.
    settings: Value,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn dtype_name(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "F32",
        DType::I64 => "I64",
        other => bail!("cannot write {other:?} results"),
    })
}

/// Bytes of one row; `None` when the shape's size overflows or passes 4 GiB
/// (no image's result is that large; a corrupt header may say so).
fn row_bytes(d: DType, shape: &[usize]) -> Option<u64> {
    let n = shape
        .iter()
        .try_fold(d.size_in_bytes() as u64, |a, &b| a.checked_mul(b as u64))?;
    (n <= 1 << 32).then_some(n)
}

/// The keys of a finished `.npy` (its `.paths.txt`) or safetensors output.
fn finished_keys(out: &Path) -> Result<Done> {
    let mut done = Done::default();
    if out.extension().is_some_and(|e| e == "npy") {
        let list = out.with_extension("paths.txt");
        let text = std::fs::read_to_string(&list)
            .with_context(|| format!("cannot read the path list {}", list.display()))?;
        done.keys = text.lines().map(str::to_string).collect();
        done.escaped = true;
    } else {
        let mut f = File::open(out).with_context(|| format!("cannot open {}", out.display()))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .with_context(|| format!("{}: not a safetensors file", out.display()))?;
        let n = u64::from_le_bytes(n);
        let len = f
            .metadata()
            .with_context(|| format!("cannot read {}", out.display()))?
            .len();
        if n > len.saturating_sub(8) {
            bail!("{}: its header runs past the file", out.display());
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)
            .with_context(|| format!("cannot read {}", out.display()))?;
        let v: serde_json::Map<String, Value> = serde_json::from_slice(&header)
            .with_context(|| format!("{}: the header is not JSON", out.display()))?;
        done.keys = v
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k != "__metadata__")
            .collect();
    }
    Ok(done)
}

/// How an array output starts: the sink, or `None` when `--resume` found the
/// output already finished (then `done` lists what it holds).
pub struct Opened {
    pub sink: Option<RowSink>,
    pub done: Done,
}

impl RowSink {
    fn partial(out: &Path) -> (PathBuf, PathBuf) {
        (
            with_suffix(out, ".partial"),
            with_suffix(out, ".partial.paths"),
        )
    }

    /// Starts `out` anew, or with `resume` continues its partial files (cut to
    /// their last complete row) or reports a finished output. `settings`
    /// must equal those the partial files were started with.
    pub fn open(out: &Path, resume: bool, settings: Value) -> Result<Opened> {
        let (data_p, list_p) = Self::partial(out);
        if resume && !list_p.exists() && out.exists() {
            // A run killed between removing the list and the data (see
            // `finish`) left a data file that no list describes: the output
            // is complete, so the stray file goes.
            if data_p.exists() {
                std::fs::remove_file(&data_p)
                    .with_context(|| format!("cannot remove {}", data_p.display()))?;
            }
            return Ok(Opened {
                sink: None,
                done: finished_keys(out)?,
            });
        }
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))
        };
        let (mut data, mut list) = (open(&data_p)?, open(&list_p)?);
        let mut sink_layout = None;
        let mut done = Done::default();
        let mut keep_list = 0u64;
        let mut n_rows = 0u64;
        if resume {
            let mut r = BufReader::new(&mut list);
            let mut line = Vec::new();
            let mut offset = 0u64;
            let mut rows = Vec::new();
            while r
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read {}", list_p.display()))?
                > 0
                && line.ends_with(b"\n")
            {
                // Only a last line without its newline is torn; a complete
                // line that is not a row means the file is not ours.
                let bad = || format!("{}: line {} is not a row", list_p.display(), rows.len() + 2);
                let body = std::str::from_utf8(&line[..line.len() - 1]).with_context(bad)?;
                if sink_layout.is_none() {
                    let v: Value = serde_json::from_str(body)
                        .with_context(|| format!("{}: bad first line", list_p.display()))?;
                    let d = match v["dtype"].as_str() {
                        Some("F32") => DType::F32,
                        Some("I64") => DType::I64,
                        _ => bail!("{}: unknown dtype in {body}", list_p.display()),
                    };
                    let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())
                        .with_context(|| format!("{}: bad shape in {body}", list_p.display()))?;
                    if v["settings"] != settings {
                        bail!(
                            "{} was started with other settings ({}; now {settings}): \
                             run without --resume to start anew",
                            list_p.display(),
                            v["settings"]
                        );
                    }
                    sink_layout = Some((d, shape));
                } else {
                    let k = serde_json::from_str::<String>(body).with_context(bad)?;
                    rows.push((k, offset + line.len() as u64));
                }
                offset += line.len() as u64;
                if rows.is_empty() {
                    keep_list = offset;
                }
                line.clear();
            }
            if let Some((d, shape)) = &sink_layout {
                let rb = row_bytes(*d, shape).with_context(|| {
                    format!(
                        "{}: rows of shape {shape:?} are too large",
                        list_p.display()
                    )
                })?;
                let have = data.metadata()?.len() / rb.max(1);
                rows.truncate(have.min(rows.len() as u64) as usize);
                if let Some((_, end)) = rows.last() {
                    keep_list = *end;
                }
                data.set_len(rows.len() as u64 * rb)?;
                n_rows = rows.len() as u64;
                done.keys = rows.into_iter().map(|(k, _)| k).collect();
            }
        }
        list.set_len(keep_list)?;
        if keep_list == 0 {
            sink_layout = None;
            data.set_len(0)?;
        }
        data.seek(SeekFrom::End(0))?;
        list.seek(SeekFrom::End(0))?;
        Ok(Opened {
            sink: Some(RowSink {
                out: out.to_path_buf(),
                data,
                list,
                rows: n_rows,
                layout: sink_layout,
                settings,
            }),
            done,
        })
    }

    /// Every stored row's bytes, in order (for statistics over a resumed run).
    pub fn for_each_row(&mut self, mut f: impl FnMut(&[u8])) -> Result<()> {
        let Some((d, shape)) = &self.layout else {
            return Ok(());
        };
        let mut row = vec![0u8; row_bytes(*d, shape).unwrap_or(0) as usize];
        self.data.seek(SeekFrom::Start(0))?;
        let mut r = BufReader::new(&mut self.data);
        for _ in 0..self.rows {
            r.read_exact(&mut row)?;
            f(&row);
        }
        drop(r);
        self.data.seek(SeekFrom::End(0))?;
        Ok(())
    }

    /// Appends one batch (each tensor one image) and syncs it.
    pub fn push(&mut self, batch: &[(String, Tensor)]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (data_p, list_p) = Self::partial(&self.out);
        let first = &batch[0].1;
        let layout = (first.dtype(), first.dims().to_vec());
        match &self.layout {
            Some(l) if *l != layout => bail!(
                "{} holds {:?} rows of shape {:?}, this run makes {:?} of {:?}: \
                 other settings (run without --resume to start anew)",
                data_p.display(),
                l.0,
                l.1,
                layout.0,
                layout.1
            ),
            Some(_) => {}
            None => {
                if row_bytes(layout.0, &layout.1).is_none() {
                    bail!("results of shape {:?} are too large to write", layout.1);
                }
                let head = serde_json::json!({"dtype": dtype_name(layout.0)?, "shape": layout.1,
                                              "settings": self.settings});
                writeln!(self.list, "{head}")?;
                self.layout = Some(layout.clone());
            }
        }
        let mut bytes = Vec::new();
        let mut names = String::new();
        for (k, t) in batch {
            if t.dtype() != layout.0 || t.dims() != layout.1.as_slice() {
                bail!("{k}: result of shape {:?}, not {:?}", t.dims(), layout.1);
            }
            match layout.0 {
                DType::F32 => {
                    for v in t.flatten_all()?.to_vec1::<f32>()? {
                        bytes.extend_from_slice(&v.to_le_bytes());
                    }
                }
                DType::I64 => {
                    for v in t.flatten_all()?.to_vec1::<i64>()? {
                        bytes.extend_from_slice(&v.to_le_bytes());
                    }
                }
                other => bail!("cannot write {other:?} results"),
            }
            names.push_str(&serde_json::to_string(k)?);
            names.push('\n');
        }
        self.data
            .write_all(&bytes)
            .and_then(|_| self.data.sync_data())
            .with_context(|| format!("cannot write {}", data_p.display()))?;
        self.list
            .write_all(names.as_bytes())
            .and_then(|_| self.list.sync_data())
            .with_context(|| format!("cannot write {}", list_p.display()))?;
        self.rows += batch.len() as u64;
        Ok(())
    }

    /// Builds the output from the partial files and removes them; returns
    /// the number of rows and their shape (none written when there are none).
    pub fn finish(mut self) -> Result<Option<(u64, Vec<usize>)>> {
        let (data_p, list_p) = Self::partial(&self.out);
        let Some((dtype, shape)) = self.layout.clone() else {
            drop(self);
            let _ = std::fs::remove_file(&data_p);
            let _ = std::fs::remove_file(&list_p);
            return Ok(None);
        };
        let rb = row_bytes(dtype, &shape).unwrap_or(0);
        let mut keys = Vec::with_capacity(self.rows as usize);
        self.list.seek(SeekFrom::Start(0))?;
        for line in BufReader::new(&mut self.list).lines().skip(1) {
            let line = line.with_context(|| format!("cannot read {}", list_p.display()))?;
            keys.push(
                serde_json::from_str::<String>(&line)
                    .with_context(|| format!("{}: not a row: {line}", list_p.display()))?,
            );
        }
        if keys.len() as u64 != self.rows {
            bail!(
                "{} lists {} rows, {} were written",
                list_p.display(),
                keys.len(),
                self.rows
            );
        }
        let mut seen = HashSet::new();
        if let Some(k) = keys.iter().find(|k| !seen.insert(k.as_str())) {
            bail!(
                "two images are both named {k:?} in the results (a file name with a \\xNN \
                 escape beside one with that byte?); rename one"
            );
        }
        self.data.seek(SeekFrom::Start(0))?;
        let mut data = (&mut self.data).take(self.rows * rb);
        if self.out.extension().is_some_and(|e| e == "npy") {
            let mut dims = vec![self.rows as usize];
            dims.extend(&shape);
            let header = super::features::npy_header(dtype, &dims)?;
            crate::util::write_atomic_with(&self.out, |w| {
                w.write_all(&header)?;
                copy_rows(&mut data, w, self.rows * rb, &data_p)
            })?;
            let list = self.out.with_extension("paths.txt");
            crate::util::write_atomic_with(&list, |w| {
                for k in &keys {
                    writeln!(w, "{}", crate::util::escape_controls(k))?;
                }
                Ok(())
            })
            .with_context(|| format!("writing the path list {}", list.display()))?;
        } else {
            let mut header = serde_json::Map::new();
            for (i, k) in keys.iter().enumerate() {
                let start = i as u64 * rb;
                header.insert(
                    k.clone(),
                    serde_json::json!({"dtype": dtype_name(dtype)?, "shape": shape,
                                       "data_offsets": [start, start + rb]}),
                );
            }
            let mut text = serde_json::to_string(&header)?;
            // Data starts 8-byte aligned, as safetensors writers do.
            text.push_str(&" ".repeat((8 - text.len() % 8) % 8));
            crate::util::write_atomic_with(&self.out, |w| {
                w.write_all(&(text.len() as u64).to_le_bytes())?;
                w.write_all(text.as_bytes())?;
                copy_rows(&mut data, w, self.rows * rb, &data_p)
            })?;
        }
        let rows = self.rows;
        drop(self);
        // The list first: without it the data file means nothing.
        std::fs::remove_file(&list_p)
            .with_context(|| format!("cannot remove {}", list_p.display()))?;
        std::fs::remove_file(&data_p)
            .with_context(|| format!("cannot remove {}", data_p.display()))?;
        Ok(Some((rows, shape)))
    }
}

/// Copies exactly `n` bytes of rows, or says that `from` is short.
fn copy_rows(from: &mut impl Read, to: &mut impl Write, n: u64, from_name: &Path) -> Result<()> {
    let copied = std::io::copy(from, to)?;
    if copied != n {
        bail!(
            "{} holds {copied} bytes of rows, not {n}",
            from_name.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_undo_quoting() {
        assert_eq!(
            csv_fields("\"a,\"\"b\"\"\nc\",2,x"),
            ["a,\"b\"\nc", "2", "x"]
        );
        assert_eq!(csv_fields("p,1,,"), ["p", "1", "", ""]);
    }
}
