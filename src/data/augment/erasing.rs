//! timm's `RandomErasing` in `mode='pixel'`, applied to the normalised CHW
//! tensor.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use super::crop::uniform;

/// Erases one (or up to `max_count`) random rectangles with per-pixel
/// standard normal noise, which in normalised space is noise with the
/// dataset's own statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomErasing {
    /// Probability of erasing anything in an image.
    pub probability: f64,
    /// Smallest rectangle area, as a fraction of the image area.
    pub min_area: f64,
    /// Largest rectangle area, as a fraction of the image area.
    pub max_area: f64,
    /// Smallest aspect ratio (height / width); the largest is its inverse.
    pub min_aspect: f64,
    /// Rectangles per erased image are drawn from `1..=max_count`, each
    /// with its area range divided by the count.
    pub max_count: usize,
}

impl Default for RandomErasing {
    /// BEiT fine-tuning's settings (`--reprob 0.25 --remode pixel
    /// --recount 1`) with timm's area and aspect defaults.
    fn default() -> Self {
        Self {
            probability: 0.25,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            min_aspect: 0.3,
            max_count: 1,
        }
    }
}

impl RandomErasing {
    /// timm's `_erase` on one `(channels, height, width)` image: with
    /// probability `probability`, for each rectangle up to ten attempts at a
    /// uniform area and log-uniform aspect; the first rectangle smaller than
    /// the image in both directions is placed uniformly and filled.
    ///
    /// # Panics
    /// If `chw.len() != channels * height * width`.
    pub fn apply(
        &self,
        chw: &mut [f32],
        channels: usize,
        height: usize,
        width: usize,
        rng: &mut (impl Rng + ?Sized),
    ) {
        assert_eq!(
            chw.len(),
            channels * height * width,
            "erasing: tensor size does not match its shape"
        );
        if rng.random::<f64>() > self.probability {
            return;
        }
        let area = (height * width) as f64;
        let log_aspect = (self.min_aspect.ln(), (1.0 / self.min_aspect).ln());
        let count = if self.max_count <= 1 {
            1
        } else {
            rng.random_range(1..=self.max_count)
        };
        for _ in 0..count {
            for _ in 0..10 {
                let target_area =
                    uniform(rng, (self.min_area, self.max_area)) * area / count as f64;
                let aspect = uniform(rng, log_aspect).exp();
                let h = (target_area * aspect).sqrt().round_ties_even() as usize;
                let w = (target_area / aspect).sqrt().round_ties_even() as usize;
                if w < width && h < height {
                    let top = rng.random_range(0..=height - h);
                    let left = rng.random_range(0..=width - w);
                    // torch's `normal_()` fills the (channels, h, w) patch in
                    // memory order.
                    for plane in chw.chunks_exact_mut(height * width) {
                        for row in plane.chunks_exact_mut(width).skip(top).take(h) {
                            for v in &mut row[left..left + w] {
                                *v = StandardNormal.sample(rng);
                            }
                        }
                    }
                    break;
                }
            }
        }
    }
}
