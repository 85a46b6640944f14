//! timm's `Mixup` in `mode='batch'`: one λ and one choice of Mixup or
//! CutMix per batch, each image mixed with its partner in the reversed
//! batch, and label-smoothed one-hot targets mixed with the same λ.

use anyhow::{bail, ensure};
use rand::Rng;
use rand_distr::{Beta, Distribution};

/// Batch-level Mixup / CutMix with label smoothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixup {
    /// Beta(α, α) parameter of Mixup's λ; Mixup is off if not positive.
    pub mixup_alpha: f64,
    /// Beta(α, α) parameter of CutMix's λ; CutMix is off if not positive.
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all.
    pub prob: f64,
    /// Probability of CutMix rather than Mixup when both are on.
    pub switch_prob: f64,
    /// Label smoothing of the one-hot targets.
    pub label_smoothing: f64,
    /// Number of classes.
    pub num_classes: usize,
}

impl Mixup {
    /// BEiT fine-tuning's settings (`--mixup 0.8 --cutmix 1.0 --smoothing
    /// 0.1`, timm's `prob=1.0`, `switch_prob=0.5`).
    pub fn beit_finetune(num_classes: usize) -> Self {
        Self {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
            num_classes,
        }
    }

    /// Mixes `images`, a contiguous `(B, C, H, W)` batch, in place and
    /// returns the `(B, num_classes)` soft targets for `labels`.
    ///
    /// Mixup: `x ← λ x + (1 − λ) x[reversed]`. CutMix: a box with sides
    /// `√(1 − λ)` of the image's, centred uniformly and clipped to the image,
    /// is pasted from the reversed batch and λ becomes the unpasted area
    /// fraction (timm's `correct_lam`). Arithmetic is in `f32` like torch's.
    ///
    /// Fails if the batch size is odd (timm asserts it), if shapes or labels
    /// disagree, or if neither Mixup nor CutMix is enabled.
    pub fn apply(
        &self,
        images: &mut [f32],
        shape: (usize, usize, usize, usize),
        labels: &[usize],
        rng: &mut (impl Rng + ?Sized),
    ) -> anyhow::Result<Vec<f32>> {
        let (batch, channels, height, width) = shape;
        ensure!(
            batch % 2 == 0,
            "mixup needs an even batch size, got {batch}"
        );
        ensure!(
            images.len() == batch * channels * height * width,
            "mixup: {} values for shape {shape:?}",
            images.len()
        );
        ensure!(
            labels.len() == batch,
            "mixup: {} labels for {batch} images",
            labels.len()
        );
        if let Some(&bad) = labels.iter().find(|&&l| l >= self.num_classes) {
            bail!(
                "mixup: label {bad} out of range for {} classes",
                self.num_classes
            );
        }
        if self.mixup_alpha <= 0.0 && self.cutmix_alpha <= 0.0 {
            bail!("mixup: one of mixup_alpha and cutmix_alpha must be positive");
        }
        let (mut lam, use_cutmix) = self.sample_lambda(rng);
        let image_len = channels * height * width;
        if lam != 1.0 && image_len > 0 {
            if use_cutmix {
                let (rows, cols) = cutmix_box(height, width, lam, rng);
                // Every image swaps the box with its partner, which is the
                // same as pasting from a reversed copy of the batch.
                for i in 0..batch / 2 {
                    let (head, tail) = images.split_at_mut((batch - 1 - i) * image_len);
                    let a = &mut head[i * image_len..][..image_len];
                    let b = &mut tail[..image_len];
                    for c in 0..channels {
                        for y in rows.clone() {
                            let at = (c * height + y) * width;
                            a[at + cols.start..at + cols.end]
                                .swap_with_slice(&mut b[at + cols.start..at + cols.end]);
                        }
                    }
                }
                let box_area = rows.len() * cols.len();
                lam = 1.0 - box_area as f64 / (height * width) as f64;
            } else {
                let (keep, take) = (lam as f32, (1.0 - lam) as f32);
                for i in 0..batch / 2 {
                    let (head, tail) = images.split_at_mut((batch - 1 - i) * image_len);
                    let a = &mut head[i * image_len..][..image_len];
                    let b = &mut tail[..image_len];
                    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                        (*x, *y) = (*x * keep + *y * take, *y * keep + *x * take);
                    }
                }
            }
        }
        Ok(self.mixed_targets(labels, lam))
    }

    /// `_params_per_batch`: λ (1 when the batch is left alone) and whether
    /// to use CutMix.
    fn sample_lambda(&self, rng: &mut (impl Rng + ?Sized)) -> (f64, bool) {
        if rng.random::<f64>() >= self.prob {
            return (1.0, false);
        }
        let use_cutmix = if self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0 {
            rng.random::<f64>() < self.switch_prob
        } else {
            self.cutmix_alpha > 0.0
        };
        let alpha = if use_cutmix {
            self.cutmix_alpha
        } else {
            self.mixup_alpha
        };
        let lam = Beta::new(alpha, alpha).expect("positive alpha").sample(rng);
        (lam, use_cutmix)
    }

    /// `mixup_target`: `y λ + y[reversed] (1 − λ)` in `f32`.
    fn mixed_targets(&self, labels: &[usize], lam: f64) -> Vec<f32> {
        let k = self.num_classes;
        let y = smooth_one_hot(labels, k, self.label_smoothing);
        let (keep, take) = (lam as f32, (1.0 - lam) as f32);
        let batch = labels.len();
        let mut out = vec![0f32; y.len()];
        for i in 0..batch {
            let (own, partner) = (&y[i * k..][..k], &y[(batch - 1 - i) * k..][..k]);
            for ((o, &a), &b) in out[i * k..][..k].iter_mut().zip(own).zip(partner) {
                *o = a * keep + b * take;
            }
        }
        out
    }
}

/// timm's `rand_bbox`: rows and columns of a box with sides `√(1 − λ)` of
/// the image's, centred at a uniform pixel and clipped to the image.
fn cutmix_box(
    height: usize,
    width: usize,
    lam: f64,
    rng: &mut (impl Rng + ?Sized),
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let ratio = (1.0 - lam).sqrt();
    // numpy draws the row centre first.
    let rows = cut_axis(height, ratio, rng);
    let cols = cut_axis(width, ratio, rng);
    (rows, cols)
}

/// One axis of [`cutmix_box`]: `int(size * ratio)` samples around a uniform
/// centre, `cut // 2` before it and `(cut + 1) // 2` from it, clipped.
fn cut_axis(size: usize, ratio: f64, rng: &mut (impl Rng + ?Sized)) -> std::ops::Range<usize> {
    let cut = (size as f64 * ratio) as usize;
    let centre = rng.random_range(0..size);
    centre.saturating_sub(cut / 2)..(centre + cut.div_ceil(2)).min(size)
}

/// Label-smoothed one-hot rows, `(labels.len(), num_classes)` row-major:
/// `smoothing / num_classes` off the label and `1 - smoothing +` that on it.
///
/// # Panics
/// If a label is not below `num_classes`.
pub fn smooth_one_hot(labels: &[usize], num_classes: usize, smoothing: f64) -> Vec<f32> {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let mut out = vec![off as f32; labels.len() * num_classes];
    for (i, &label) in labels.iter().enumerate() {
        assert!(
            label < num_classes,
            "label {label} out of range for {num_classes} classes"
        );
        out[i * num_classes + label] = on as f32;
    }
    out
}
