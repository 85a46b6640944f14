//! Parallel, deterministic, resumable batch loading.
//!
//! Determinism is by construction rather than by scheduling: an epoch's
//! sample order is a permutation drawn from `(seed, epoch)`, and each
//! sample's augmentation draws from its own RNG keyed by
//! `(seed, epoch, sample index)`. So the content of batch `b` of epoch `e`
//! depends on nothing else: not on the number of decode threads, how far
//! ahead they run, or whether the epoch was resumed at batch `b` after a
//! restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Context, anyhow, ensure};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::dataset::Dataset;
use super::decode::RgbImage;
use super::transforms::EvalTransform;

/// Per-sample preprocessing, from decoded RGB to normalised CHW `f32`.
pub trait SampleTransform: Send + Sync {
    /// Transforms one image. Random choices must come from `rng` only, which
    /// is what makes batches reproducible.
    fn apply(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<f32>>;

    /// `(height, width)` of every output; `apply` returns `3 * h * w` values.
    fn output_hw(&self) -> (usize, usize);

    /// Values per sample: `3 * h * w` for an image; more for a transform
    /// whose samples are records of several parts (views and a mask).
    fn output_len(&self) -> usize {
        let (h, w) = self.output_hw();
        3 * h * w
    }
}

/// The eval transform is deterministic and ignores the RNG.
impl SampleTransform for EvalTransform {
    fn apply(&self, img: &RgbImage, _rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<f32>> {
        self.preprocess(img)
    }

    fn output_hw(&self) -> (usize, usize) {
        self.crop
    }
}

/// One batch of transformed samples.
#[derive(Debug)]
pub struct Batch {
    /// `(B, 3, H, W)` row-major, `B = indices.len()` (or `B` records of
    /// [`SampleTransform::output_len`] values).
    pub images: Vec<f32>,
    /// `(H, W)` of each image.
    pub hw: (usize, usize),
    /// Labels of the images, in order; empty for an unlabelled dataset.
    pub labels: Vec<usize>,
    /// Dataset indices of the images, in order.
    pub indices: Vec<usize>,
    /// Samples of this batch that could not be loaded or transformed, with
    /// the reason; they are left out of `images`, `labels` and `indices`.
    pub failures: Vec<(String, anyhow::Error)>,
}

impl Batch {
    /// Number of images (failed samples excluded).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether no image of the batch could be loaded.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The images as a `(B, 3, H, W)` f32 tensor on `device`.
    pub fn images_tensor(&self, device: &Device) -> anyhow::Result<Tensor> {
        let (h, w) = self.hw;
        Ok(Tensor::from_slice(
            &self.images,
            (self.len(), 3, h, w),
            device,
        )?)
    }

    /// The labels as a `(B,)` u32 tensor on `device` (the target type of
    /// candle's cross-entropy); an error for unlabelled data.
    pub fn labels_tensor(&self, device: &Device) -> anyhow::Result<Tensor> {
        ensure!(
            self.labels.len() == self.len(),
            "batch has {} labels for {} images (unlabelled dataset?)",
            self.labels.len(),
            self.len()
        );
        let labels = self
            .labels
            .iter()
            .map(|&l| u32::try_from(l).context("label does not fit in u32"))
            .collect::<anyhow::Result<Vec<u32>>>()?;
        Ok(Tensor::from_vec(labels, self.len(), device)?)
    }
}

/// How a [`Loader`] batches an epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch (positive).
    pub batch_size: usize,
    /// Whether each epoch visits the samples in a fresh random order.
    pub shuffle: bool,
    /// Whether to skip a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Seed of the shuffles and of the per-sample RNGs.
    pub seed: u64,
    /// Decode/transform threads; 0 means one per CPU core.
    pub workers: usize,
    /// Finished batches that may wait ahead of the consumer (0 counts as 1:
    /// the next batch is always prepared while the current one is used).
    pub prefetch: usize,
}

/// Batches a [`Dataset`] through a [`SampleTransform`] on its own thread
/// pool, so decoding never competes for the global rayon pool the model's
/// kernels use.
pub struct Loader<T: SampleTransform> {
    dataset: Arc<Dataset>,
    transform: Arc<T>,
    cfg: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
}

/// Domain tags in the RNG keys, so an epoch's shuffle stream and its
/// per-sample streams can never coincide.
const SHUFFLE_TAG: u64 = u64::from_le_bytes(*b"shuffle\0");
const SAMPLE_TAG: u64 = u64::from_le_bytes(*b"sample\0\0");

/// A ChaCha8 key built from `(seed, epoch, tag)`; ChaCha is a PRF, so
/// structured keys give independent streams.
fn keyed_rng(seed: u64, epoch: u64, tag: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&tag.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// The RNG that sample `index` (a dataset index) is transformed with in
/// `epoch`. It depends on nothing else, so results are identical for any
/// number of workers, any prefetch depth and any resume point.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    keyed_rng(seed, epoch, SAMPLE_TAG, index as u64)
}

impl<T: SampleTransform + 'static> Loader<T> {
    /// A loader with its own pool of `cfg.workers` threads.
    pub fn new(
        dataset: Arc<Dataset>,
        transform: Arc<T>,
        cfg: LoaderConfig,
    ) -> anyhow::Result<Self> {
        ensure!(cfg.batch_size > 0, "batch size must be positive");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers)
            .thread_name(|i| format!("loader-{i}"))
            .build()
            .context("cannot start the loader threads")?;
        Ok(Self {
            dataset,
            transform,
            cfg,
            pool: Arc::new(pool),
        })
    }

    /// The dataset being loaded.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Batches in one epoch: `len / batch_size`, rounded up unless
    /// `drop_last`.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order in which `epoch` visits dataset indices: a permutation drawn
    /// from `(seed, epoch)` when shuffling, `0..len` otherwise.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut keyed_rng(self.cfg.seed, epoch, SHUFFLE_TAG, 0));
        }
        order
    }

    /// Batches `start_batch..batches_per_epoch()` of `epoch`, in order. A
    /// background thread prepares them on the loader's pool up to
    /// `prefetch` batches ahead; earlier batches are skipped without being
    /// decoded, so resuming mid-epoch yields exactly the batches an
    /// uninterrupted epoch would have.
    ///
    /// Dropping the iterator early cancels the work in flight and waits for
    /// the background thread to exit. A panic in a transform is re-raised
    /// by `next`.
    ///
    /// # Panics
    /// If the background thread cannot be spawned.
    pub fn iter_epoch(&self, epoch: u64, start_batch: usize) -> EpochIter {
        let total = self.batches_per_epoch();
        let producer = Producer {
            dataset: Arc::clone(&self.dataset),
            transform: Arc::clone(&self.transform),
            pool: Arc::clone(&self.pool),
            order: self.epoch_order(epoch),
            batch_size: self.cfg.batch_size,
            seed: self.cfg.seed,
            epoch,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        let cancel = Arc::clone(&producer.cancel);
        let (tx, rx) = sync_channel(self.cfg.prefetch.saturating_sub(1));
        let batches = start_batch.min(total)..total;
        let remaining = batches.len();
        let handle = std::thread::Builder::new()
            .name(format!("loader-epoch-{epoch}"))
            .spawn(move || producer.run(batches, &tx))
            .expect("cannot spawn the loader thread");
        EpochIter {
            rx: Some(rx),
            producer: Some(handle),
            cancel,
            remaining,
        }
    }
}

/// Everything the background thread of one epoch needs.
struct Producer<T> {
    dataset: Arc<Dataset>,
    transform: Arc<T>,
    pool: Arc<rayon::ThreadPool>,
    order: Vec<usize>,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    cancel: Arc<AtomicBool>,
}

impl<T: SampleTransform> Producer<T> {
    /// Builds and sends the batches until done, cancelled, or the receiver
    /// is gone.
    fn run(&self, batches: std::ops::Range<usize>, tx: &SyncSender<Batch>) {
        for b in batches {
            let end = ((b + 1) * self.batch_size).min(self.order.len());
            let Some(batch) = self.build(&self.order[b * self.batch_size..end]) else {
                return;
            };
            if tx.send(batch).is_err() {
                return;
            }
        }
    }

    /// The batch of dataset indices `indices`, or `None` once cancelled.
    fn build(&self, indices: &[usize]) -> Option<Batch> {
        let outputs: Vec<anyhow::Result<Vec<f32>>> = self.pool.install(|| {
            indices
                .par_iter()
                .map(|&i| {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(anyhow!("cancelled"));
                    }
                    self.sample(i)
                })
                .collect()
        });
        if self.cancel.load(Ordering::Relaxed) {
            return None;
        }
        let hw = self.transform.output_hw();
        let mut batch = Batch {
            images: Vec::with_capacity(indices.len() * self.transform.output_len()),
            hw,
            labels: Vec::with_capacity(indices.len()),
            indices: Vec::with_capacity(indices.len()),
            failures: Vec::new(),
        };
        for (&i, output) in indices.iter().zip(outputs) {
            match output {
                Ok(chw) => {
                    batch.images.extend_from_slice(&chw);
                    batch.labels.extend(self.dataset.label(i));
                    batch.indices.push(i);
                }
                Err(e) => batch.failures.push((self.dataset.sample_name(i), e)),
            }
        }
        Some(batch)
    }

    /// Decodes and transforms dataset sample `i`, checking the output size
    /// so that one bad transform cannot misalign the whole batch.
    fn sample(&self, i: usize) -> anyhow::Result<Vec<f32>> {
        let img = self.dataset.load_rgb(i)?;
        let mut rng = sample_rng(self.seed, self.epoch, i);
        let chw = self
            .transform
            .apply(&img, &mut rng)
            .with_context(|| format!("cannot transform {}", self.dataset.sample_name(i)))?;
        let want = self.transform.output_len();
        ensure!(
            chw.len() == want,
            "transform returned {} values for {}, expected {want}",
            chw.len(),
            self.dataset.sample_name(i)
        );
        Ok(chw)
    }
}

/// The batches of one epoch, produced in the background; see
/// [`Loader::iter_epoch`].
pub struct EpochIter {
    rx: Option<Receiver<Batch>>,
    producer: Option<JoinHandle<()>>,
    cancel: Arc<AtomicBool>,
    remaining: usize,
}

impl EpochIter {
    /// Waits for the background thread; its panic, if any.
    fn join(&mut self) -> Option<Box<dyn std::any::Any + Send>> {
        self.producer.take()?.join().err()
    }
}

impl Iterator for EpochIter {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let received = self.rx.as_ref()?.recv();
        match received {
            Ok(batch) => {
                self.remaining -= 1;
                Some(batch)
            }
            Err(_) => {
                // The producer is done: finished, or died.
                self.rx = None;
                self.remaining = 0;
                if let Some(panic) = self.join() {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        // Unblocks a producer waiting in `send`.
        self.rx = None;
        // A producer panic is not re-raised here: panicking in drop aborts.
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn rng_streams_are_distinct() {
        let draw = |mut r: ChaCha8Rng| r.next_u64();
        let a = draw(sample_rng(1, 0, 0));
        assert_eq!(a, draw(sample_rng(1, 0, 0)));
        assert_ne!(a, draw(sample_rng(1, 0, 1)));
        assert_ne!(a, draw(sample_rng(1, 1, 0)));
        assert_ne!(a, draw(sample_rng(2, 0, 0)));
        assert_ne!(a, draw(keyed_rng(1, 0, SHUFFLE_TAG, 0)));
    }
}
