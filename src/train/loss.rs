//! Classification losses and accuracy.

use anyhow::Result;
use candle_core::{D, Device, Tensor};

/// Soft-target cross entropy: `mean_b Σ_k −target[b,k]·log_softmax(logits)[b,k]`
/// (timm `SoftTargetCrossEntropy`; with smoothed one-hot targets it equals
/// `LabelSmoothingCrossEntropy`).
pub fn soft_target_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((logp * targets)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

/// Smoothed one-hot targets (B, K): `1 − s + s/K` on the label, `s/K` elsewhere.
pub fn smoothed_targets(labels: &[usize], num_classes: usize, smoothing: f64) -> Result<Tensor> {
    let off = (smoothing / num_classes as f64) as f32;
    let on = (1.0 - smoothing) as f32 + off;
    let mut data = vec![off; labels.len() * num_classes];
    for (row, &l) in labels.iter().enumerate() {
        data[row * num_classes + l] = on;
    }
    Ok(Tensor::from_vec(
        data,
        (labels.len(), num_classes),
        &Device::Cpu,
    )?)
}

/// Number of rows whose true label is among the `k` highest logits.
pub fn correct_top_k(logits: &[Vec<f32>], labels: &[usize], k: usize) -> usize {
    logits
        .iter()
        .zip(labels)
        .filter(|(row, l)| {
            let target = row[**l];
            // Ties and NaN count against: the label must strictly beat all
            // but k−1 of the other classes.
            let not_beaten = row
                .iter()
                .enumerate()
                .filter(|&(j, &v)| {
                    j != **l && v.partial_cmp(&target) != Some(std::cmp::Ordering::Less)
                })
                .count();
            not_beaten < k
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_by_hand() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let t = smoothed_targets(&[2], 3, 0.0).unwrap();
        let l = soft_target_cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = -(3.0f32 - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln());
        assert!((l - want).abs() < 1e-6);
        let s = smoothed_targets(&[0, 2], 4, 0.1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((s[0][0] - 0.925).abs() < 1e-7 && (s[0][1] - 0.025).abs() < 1e-7);
        assert!((s[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_counts() {
        let logits = vec![vec![0.1, 0.9, 0.0], vec![0.5, 0.2, 0.3]];
        assert_eq!(correct_top_k(&logits, &[1, 2], 1), 1);
        assert_eq!(correct_top_k(&logits, &[1, 2], 2), 2);
        assert_eq!(correct_top_k(&[vec![1.0, 1.0, 1.0]], &[0], 1), 0);
        assert_eq!(correct_top_k(&[vec![f32::NAN, 0.0]], &[0], 1), 0);
    }
}
