//! Block-wise masking for masked image modeling (spec F.2): rectangles of
//! patches with a random area and aspect ratio are masked until a fixed
//! number of patches is covered, as unilm's beit2 `MaskingGenerator` does,
//! including its final fix-up that makes the count exact.

use anyhow::{Result, bail};
use rand::Rng;
use rand::seq::index::sample;

/// The generator's parameters (unilm's defaults for BEiT v2 at 224 px:
/// a 14×14 grid, 75 masked patches, blocks of at least 16).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskingGenerator {
    /// Grid rows.
    pub height: usize,
    /// Grid columns.
    pub width: usize,
    /// Patches masked in every mask (exactly).
    pub num_masking_patches: usize,
    /// Smallest area a block aims for.
    pub min_num_patches: usize,
    /// Largest number of new patches one block may add.
    pub max_num_patches: usize,
    /// `(ln min_aspect, ln max_aspect)`.
    pub log_aspect: (f64, f64),
}

impl MaskingGenerator {
    /// A generator; `max_num_patches` defaults to `num_masking_patches` and
    /// `max_aspect` to `1 / min_aspect`, as upstream.
    pub fn new(
        (height, width): (usize, usize),
        num_masking_patches: usize,
        min_num_patches: usize,
        max_num_patches: Option<usize>,
        min_aspect: f64,
        max_aspect: Option<f64>,
    ) -> Result<Self> {
        if height == 0 || width == 0 {
            bail!("the mask grid {height}x{width} is empty");
        }
        if num_masking_patches > height * width {
            bail!(
                "mask.num_patches = {num_masking_patches} does not fit a {height}x{width} grid ({} patches)",
                height * width
            );
        }
        if !(min_aspect > 0.0 && min_aspect.is_finite()) {
            bail!("mask.min_aspect = {min_aspect} must be positive");
        }
        let max_aspect = max_aspect.unwrap_or(1.0 / min_aspect);
        if !(max_aspect > 0.0 && max_aspect.is_finite()) {
            bail!("mask.max_aspect = {max_aspect} must be positive");
        }
        Ok(Self {
            height,
            width,
            num_masking_patches,
            min_num_patches,
            max_num_patches: max_num_patches.unwrap_or(num_masking_patches),
            log_aspect: (min_aspect.ln(), max_aspect.ln()),
        })
    }

    /// BEiT v2's pretraining masks for a grid: 75 patches of 196 at 14×14,
    /// scaled to the same fraction (rounded) for other grids.
    pub fn beitv2(grid: (usize, usize)) -> Result<Self> {
        let n = grid.0 * grid.1;
        let scaled = |k: usize| (k * n + 98) / 196;
        Self::new(grid, scaled(75), scaled(16).max(1), None, 0.3, None)
    }

    /// One block attempt (up to ten tries): the number of patches it newly
    /// masked (0 when no try fitted).
    fn mask_block(&self, mask: &mut [bool], budget: usize, rng: &mut (impl Rng + ?Sized)) -> usize {
        let mut delta = 0;
        for _ in 0..10 {
            // Python's random.uniform(a, b) = a + (b - a) * U[0, 1) (b < a allowed).
            let (lo, hi) = (self.min_num_patches as f64, budget as f64);
            let target_area = lo + (hi - lo) * rng.random::<f64>();
            let (la, lb) = self.log_aspect;
            let aspect = (la + (lb - la) * rng.random::<f64>()).exp();
            let h = (target_area * aspect).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect).sqrt().round_ties_even() as usize;
            if w < self.width && h < self.height {
                let top = rng.random_range(0..=self.height - h);
                let left = rng.random_range(0..=self.width - w);
                let already = (top..top + h)
                    .flat_map(|i| (left..left + w).map(move |j| i * self.width + j))
                    .filter(|&p| mask[p])
                    .count();
                let new = h * w - already;
                if 0 < new && new <= budget {
                    for i in top..top + h {
                        for m in &mut mask[i * self.width + left..i * self.width + left + w] {
                            if !*m {
                                *m = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }

    /// A mask over the grid, row-major, with exactly `num_masking_patches`
    /// cells set.
    pub fn generate(&self, rng: &mut (impl Rng + ?Sized)) -> Vec<bool> {
        self.generate_with_blocks(rng).0
    }

    /// [`Self::generate`], also returning how many patches each block added
    /// before the fix-up (for statistics).
    pub fn generate_with_blocks(&self, rng: &mut (impl Rng + ?Sized)) -> (Vec<bool>, Vec<usize>) {
        let n = self.height * self.width;
        let mut blocks = Vec::new();
        let target = self.num_masking_patches;
        let mut mask = vec![false; n];
        let mut count = 0;
        while count < target {
            let budget = (target - count).min(self.max_num_patches);
            let delta = self.mask_block(&mut mask, budget, rng);
            if delta == 0 {
                break;
            }
            blocks.push(delta);
            count += delta;
        }
        // Exact-count fix-up: unmask or mask randomly chosen cells.
        let (state, k) = if count > target {
            (true, count - target)
        } else {
            (false, target - count)
        };
        if k > 0 {
            let cells: Vec<usize> = (0..n).filter(|&p| mask[p] == state).collect();
            for i in sample(rng, cells.len(), k) {
                mask[cells[i]] = !state;
            }
        }
        debug_assert_eq!(mask.iter().filter(|&&m| m).count(), target);
        (mask, blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn impossible_counts_are_configuration_errors() {
        let e = MaskingGenerator::new((4, 4), 17, 4, None, 0.3, None).unwrap_err();
        assert!(e.to_string().contains("mask.num_patches"), "{e}");
        assert!(MaskingGenerator::new((0, 4), 0, 4, None, 0.3, None).is_err());
        assert!(MaskingGenerator::new((4, 4), 16, 4, None, 0.3, None).is_ok());
    }

    #[test]
    fn a_full_or_empty_mask_is_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let g = MaskingGenerator::new((3, 5), 15, 4, None, 0.3, None).unwrap();
        assert!(g.generate(&mut rng).iter().all(|&m| m));
        let g = MaskingGenerator::new((3, 5), 0, 4, None, 0.3, None).unwrap();
        assert!(g.generate(&mut rng).iter().all(|&m| !m));
    }
}
