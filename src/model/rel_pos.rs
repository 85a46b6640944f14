//! Relative position bias: the index that maps every (query, key) token pair to a
//! table row (spec A.3), and the resampling of a table to another window size
//! (spec B).

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Rows of the table for a `(rows, cols)` patch window: one per relative offset
/// plus three for CLS→token, token→CLS and CLS→CLS.
pub fn table_len(window: (usize, usize)) -> usize {
    (2 * window.0 - 1) * (2 * window.1 - 1) + 3
}

/// The `(N, N)` table-row index for `N = 1 + rows·cols` tokens, CLS first,
/// patches row-major. Offsets are query minus key; the CLS row and column get
/// the last three rows in the order of the reference implementations.
pub fn relative_position_index(window: (usize, usize)) -> Vec<u32> {
    let (wh, ww) = window;
    let n = wh * ww + 1;
    let l = table_len(window) as u32;
    let span = (2 * ww - 1) as i64;
    let mut index = vec![0u32; n * n];
    for qi in 0..wh * ww {
        let (qh, qw) = ((qi / ww) as i64, (qi % ww) as i64);
        for ki in 0..wh * ww {
            let (kh, kw) = ((ki / ww) as i64, (ki % ww) as i64);
            let row = (qh - kh + wh as i64 - 1) * span + (qw - kw + ww as i64 - 1);
            index[(qi + 1) * n + ki + 1] = row as u32;
        }
    }
    index[..n].fill(l - 3); // CLS query → any key
    for i in 0..n {
        index[i * n] = l - 2; // any query → CLS key
    }
    index[0] = l - 1; // CLS → CLS
    index
}

/// The index as a flat `u32` tensor of `N·N` entries, ready for `index_select`.
pub fn relative_position_index_tensor(
    window: (usize, usize),
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let idx = relative_position_index(window);
    let len = idx.len();
    Tensor::from_vec(idx, len, dev)
}

/// Gathers a `(L, heads)` table into the `(heads, N, N)` bias added to the
/// attention logits. Differentiable with respect to the table.
pub fn gather_bias(table: &Tensor, index: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let heads = table.dim(1)?;
    let bias = table.contiguous()?.index_select(index, 0)?; // (N·N, heads)
    bias.reshape((n, n, heads))?
        .permute((2, 0, 1))?
        .contiguous()
}

/// How a table is resampled to a new window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RelPosInterp {
    /// unilm / mmpretrain: not-a-knot bicubic spline (SciPy `interp2d(kind='cubic')`).
    /// The default: it is the method the BEiT authors fine-tuned with, and they
    /// report that linear interpolation hurt ADE20K (microsoft/unilm#376).
    #[default]
    Cubic,
    /// timm's default: piecewise linear on the same geometric grid.
    Linear,
}

/// Source sample positions for one axis: `src` samples spread by a geometric
/// progression so that the outermost lands near `±(dst // 2)` (spec B.2).
fn geometric_positions(src: usize, dst: usize) -> Vec<f64> {
    let n = src / 2;
    let target = (dst / 2) as f64;
    let gp = |q: f64| (1.0 - q.powf(n as f64)) / (1.0 - q);
    let (mut left, mut right) = (1.01f64, 1.5f64);
    let mut q = left;
    // The reference keeps the last midpoint it evaluated, not the final bounds.
    while right - left > 1e-6 {
        q = (left + right) / 2.0;
        if gp(q) > target {
            right = q;
        } else {
            left = q;
        }
    }
    let mut dis = Vec::with_capacity(n);
    let mut cur = 1.0f64;
    for i in 0..n {
        dis.push(cur);
        cur += q.powf((i + 1) as f64);
    }
    let mut pos: Vec<f64> = dis.iter().rev().map(|d| -d).collect();
    pos.push(0.0);
    pos.extend(dis);
    pos
}

/// Unit-spaced target positions `-(dst//2) ..= dst//2`.
fn target_positions(dst: usize) -> Vec<f64> {
    let t = (dst / 2) as i64;
    (-t..=t).map(|v| v as f64).collect()
}

/// `(targets × sources)` matrix of piecewise-linear interpolation weights, with
/// targets outside the source range clamped to the end values (as timm's
/// `RegularGridInterpolator` does).
fn linear_weights(src: &[f64], dst: &[f64]) -> Vec<Vec<f64>> {
    dst.iter()
        .map(|&t| {
            let mut w = vec![0.0; src.len()];
            let last = src.len() - 1;
            if src.len() == 1 || t <= src[0] {
                w[0] = 1.0;
            } else if t >= src[last] {
                w[last] = 1.0;
            } else {
                let r = src.iter().position(|&s| s >= t).unwrap_or(last);
                let l = r - 1;
                let (dl, dr) = (t - src[l], src[r] - t);
                w[l] = dr / (dl + dr);
                w[r] = dl / (dl + dr);
            }
            w
        })
        .collect()
}

/// Solves `a·x = b` by Gaussian elimination with partial pivoting (tiny systems).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, piv);
        b.swap(col, piv);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (i, row) in rest.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            if f != 0.0 {
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
                b[col + 1 + i] -= f * b[col];
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// Values at `dst` of the not-a-knot cubic spline through `(src, y)`, targets
/// clamped to the source range (what FITPACK does for `interp2d`). With fewer
/// than four samples the not-a-knot spline is the interpolating polynomial.
fn spline_eval(src: &[f64], y: &[f64], dst: &[f64]) -> Vec<f64> {
    let n = src.len();
    let clamp = |t: f64| t.clamp(src[0], src[n - 1]);
    if n < 4 {
        return dst
            .iter()
            .map(|&t| {
                let t = clamp(t);
                (0..n)
                    .map(|i| {
                        let li: f64 = (0..n)
                            .filter(|&j| j != i)
                            .map(|j| (t - src[j]) / (src[i] - src[j]))
                            .product();
                        y[i] * li
                    })
                    .sum()
            })
            .collect();
    }
    let h: Vec<f64> = src.windows(2).map(|w| w[1] - w[0]).collect();
    // Unknowns: second derivatives m_0..m_{n-1}.
    let mut a = vec![vec![0.0; n]; n];
    let mut b = vec![0.0; n];
    // Not-a-knot: the third derivative is continuous at x_1 and x_{n-2}.
    a[0][0] = h[1];
    a[0][1] = -(h[0] + h[1]);
    a[0][2] = h[0];
    for i in 1..n - 1 {
        a[i][i - 1] = h[i - 1];
        a[i][i] = 2.0 * (h[i - 1] + h[i]);
        a[i][i + 1] = h[i];
        b[i] = 6.0 * ((y[i + 1] - y[i]) / h[i] - (y[i] - y[i - 1]) / h[i - 1]);
    }
    a[n - 1][n - 3] = h[n - 2];
    a[n - 1][n - 2] = -(h[n - 3] + h[n - 2]);
    a[n - 1][n - 1] = h[n - 3];
    let m = solve(a, b);
    dst.iter()
        .map(|&t| {
            let t = clamp(t);
            let i = (0..n - 1).rfind(|&i| src[i] <= t).unwrap_or(0);
            let (x0, x1, hi) = (src[i], src[i + 1], h[i]);
            let (u, v) = (x1 - t, t - x0);
            m[i] * u.powi(3) / (6.0 * hi)
                + m[i + 1] * v.powi(3) / (6.0 * hi)
                + (y[i] / hi - m[i] * hi / 6.0) * u
                + (y[i + 1] / hi - m[i + 1] * hi / 6.0) * v
        })
        .collect()
}

/// `(targets × sources)` weights of the spline interpolant: the spline is linear
/// in the data, so interpolating each unit vector gives its columns.
fn cubic_weights(src: &[f64], dst: &[f64]) -> Vec<Vec<f64>> {
    let mut w = vec![vec![0.0; src.len()]; dst.len()];
    for j in 0..src.len() {
        let mut e = vec![0.0; src.len()];
        e[j] = 1.0;
        for (row, v) in w.iter_mut().zip(spline_eval(src, &e, dst)) {
            row[j] = v;
        }
    }
    w
}

fn axis_weights(src: usize, dst: usize, interp: RelPosInterp) -> Vec<Vec<f64>> {
    let s = geometric_positions(src, dst);
    let t = target_positions(dst);
    match interp {
        RelPosInterp::Linear => linear_weights(&s, &t),
        RelPosInterp::Cubic => cubic_weights(&s, &t),
    }
}

/// Resamples a `(L, heads)` table from window `src` to window `dst` (spec B):
/// the offset rows are resampled per head as a `(2h−1)×(2w−1)` grid on the
/// geometric source positions; the three CLS rows are copied.
pub fn resize_table(
    table: &[f32],
    heads: usize,
    src: (usize, usize),
    dst: (usize, usize),
    interp: RelPosInterp,
) -> Result<Vec<f32>> {
    let (sh, sw) = (2 * src.0 - 1, 2 * src.1 - 1);
    let (dh, dw) = (2 * dst.0 - 1, 2 * dst.1 - 1);
    if table.len() != table_len(src) * heads {
        bail!(
            "relative position table has {} values, expected {} rows × {heads} heads for a {}×{} window",
            table.len(),
            table_len(src),
            src.0,
            src.1
        );
    }
    if src == dst {
        return Ok(table.to_vec());
    }
    let wy = axis_weights(sh, dh, interp);
    let wx = axis_weights(sw, dw, interp);
    let mut out = vec![0f32; table_len(dst) * heads];
    for head in 0..heads {
        let z = |r: usize, c: usize| table[(r * sw + c) * heads + head] as f64;
        // Columns first: tmp[r][c'] = Σ_c z[r][c]·wx[c'][c].
        let tmp: Vec<Vec<f64>> = (0..sh)
            .map(|r| {
                wx.iter()
                    .map(|wrow| (0..sw).map(|c| z(r, c) * wrow[c]).sum())
                    .collect()
            })
            .collect();
        for (r2, wrow) in wy.iter().enumerate() {
            for c2 in 0..dw {
                let v: f64 = (0..sh).map(|r| tmp[r][c2] * wrow[r]).sum();
                out[(r2 * dw + c2) * heads + head] = v as f32;
            }
        }
    }
    let extra_src = sh * sw * heads;
    let extra_dst = dh * dw * heads;
    out[extra_dst..].copy_from_slice(&table[extra_src..]);
    Ok(out)
}

/// The window a table of `len` rows was trained for, assuming a square window.
pub fn square_window_for_len(len: usize) -> Option<(usize, usize)> {
    let side = ((len.checked_sub(3)? as f64).sqrt().round()) as usize;
    if side.checked_mul(side)?.checked_add(3)? == len && side % 2 == 1 {
        let w = side.div_ceil(2);
        Some((w, w))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_worked_values() {
        // Spec A.3, 14×14 window.
        let idx = relative_position_index((14, 14));
        let n = 197;
        let at = |i: usize, j: usize| idx[i * n + j];
        assert_eq!(table_len((14, 14)), 732);
        assert_eq!(at(1, 1), 364);
        assert_eq!(at(1, 2), 363);
        assert_eq!(at(2, 1), 365);
        assert_eq!(at(1, 15), 337);
        assert_eq!(at(1, 196), 0);
        assert_eq!(at(196, 1), 728);
        assert_eq!(at(0, 5), 729);
        assert_eq!(at(5, 0), 730);
        assert_eq!(at(0, 0), 731);
    }

    #[test]
    fn geometric_ratio_and_outermost_positions() {
        // Spec B.2: 27 → 47 gives q = 1.090307446 and ±22.99993406.
        let p = geometric_positions(27, 47);
        assert_eq!(p.len(), 27);
        assert!((p[26] - 22.99993406).abs() < 1e-7, "{}", p[26]);
        assert!(p[13] == 0.0 && p[14] == 1.0);
        assert!((p[15] - 2.09030745).abs() < 1e-7);
        let p = geometric_positions(27, 63);
        assert!((p[26] - 31.00018).abs() < 1e-4);
    }

    #[test]
    fn spline_reproduces_cubics_and_interpolates() {
        let x = [-3.5, -2.0, -1.0, 0.0, 1.0, 2.2, 3.9];
        let f = |t: f64| 0.3 * t * t * t - t * t + 2.0 * t - 1.0;
        let y: Vec<f64> = x.iter().map(|&t| f(t)).collect();
        let t = [-3.0, -0.5, 0.25, 3.0, 3.9];
        for (v, &ti) in spline_eval(&x, &y, &t).iter().zip(&t) {
            assert!((v - f(ti)).abs() < 1e-9, "{v} vs {}", f(ti));
        }
        // Out-of-range targets are clamped.
        let v = spline_eval(&x, &y, &[10.0]);
        assert!((v[0] - f(3.9)).abs() < 1e-9);
    }

    #[test]
    fn resize_keeps_cls_rows_and_identity() {
        let heads = 2;
        let src = (2, 2);
        let table: Vec<f32> = (0..table_len(src) * heads).map(|v| v as f32).collect();
        for interp in [RelPosInterp::Cubic, RelPosInterp::Linear] {
            let same = resize_table(&table, heads, src, src, interp).unwrap();
            assert_eq!(same, table);
            let big = resize_table(&table, heads, src, (3, 3), interp).unwrap();
            assert_eq!(big.len(), table_len((3, 3)) * heads);
            assert_eq!(&big[big.len() - 6..], &table[table.len() - 6..]);
        }
        assert_eq!(square_window_for_len(732), Some((14, 14)));
        assert_eq!(square_window_for_len(731), None);
    }
}
