//! PNG line charts of training curves (loss, accuracy, learning rate,
//! codebook usage), drawn by a small self-contained rasteriser.
//!
//! A [`Chart`] holds named [`Series`] of `(x, y)` points. [`render`] draws it
//! on a white RGB image: a framed plot area with light grid lines at "nice"
//! ticks (1, 2 or 5 × 10^k) and numeric tick labels, a title, axis labels, a
//! legend, and each series as a 2 px anti-aliased polyline in a colour from
//! the fixed [`PALETTE`]. Text uses an embedded 5×7 bitmap font (with
//! descenders) for printable ASCII; the title is drawn at twice that size.
//!
//! Points with a non-finite coordinate (and, on a logarithmic y axis, points
//! with `y <= 0`) are skipped and break the line, so gaps stay visible. A
//! point with no drawable neighbour is drawn as a dot. Empty, constant or
//! single-point data get a padded range instead of an error.

use anyhow::{Context, Result, ensure};
use image::{GenericImage, Rgb, RgbImage};
use std::path::Path;

/// Width of the images written by [`save_png`] and of each [`save_panels`] panel.
pub const DEFAULT_WIDTH: u32 = 900;
/// Height of the images written by [`save_png`] and of each [`save_panels`] panel.
pub const DEFAULT_HEIGHT: u32 = 540;

/// Series colours, assigned by series index and reused after eight series
/// (blue, orange, green, red, purple, brown, pink, cyan).
pub const PALETTE: [Rgb<u8>; 8] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([23, 190, 207]),
];

/// A line of data points with a legend name.
///
/// Points are joined in the order given; a point that cannot be drawn ends
/// the current line, leaving a gap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Legend entry; series with an empty name are left out of the legend.
    pub name: String,
    /// `(x, y)` data points.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series called `name` with the given points.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// A line chart: labels, series and the y scale.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chart {
    /// Drawn centred above the plot at twice the text size; may be empty.
    pub title: String,
    /// Drawn under the x axis; may be empty.
    pub x_label: String,
    /// Drawn rotated, left of the y axis; may be empty.
    pub y_label: String,
    /// The curves; series `i` is drawn in `PALETTE[i % PALETTE.len()]`.
    pub series: Vec<Series>,
    /// Base-10 logarithmic y axis; points with `y <= 0` are then skipped.
    pub log_y: bool,
}

/// Draws `chart` on a new `width` × `height` image.
///
/// Fails when either side exceeds 32768 pixels or the image is too small to
/// leave a plot area after the margins for title, labels and ticks (roughly
/// below 120 × 100).
pub fn render(chart: &Chart, width: u32, height: u32) -> Result<RgbImage> {
    ensure!(
        width <= MAX_SIDE && height <= MAX_SIDE,
        "a {width}x{height} chart is too large (at most {MAX_SIDE} pixels a side)"
    );
    let runs: Vec<Vec<&[(f64, f64)]>> = chart
        .series
        .iter()
        .map(|s| drawable_runs(&s.points, chart.log_y))
        .collect();
    let points = || runs.iter().flatten().flat_map(|run| run.iter());
    let x_target = (width / 180).clamp(2, 6) as usize;
    let y_target = (height / 108).clamp(2, 6) as usize;
    let (x_lo, x_hi) = value_range(points().map(|p| p.0)).unwrap_or((0.0, 1.0));
    let x_axis = Axis::linear(x_lo, x_hi, x_target);
    let y_axis = match value_range(points().map(|p| p.1)) {
        Some((lo, hi)) if chart.log_y => Axis::log10(lo, hi, y_target),
        None if chart.log_y => Axis::log10(1.0, 10.0, y_target),
        range => {
            let (lo, hi) = range.unwrap_or((0.0, 1.0));
            Axis::linear(lo, hi, y_target)
        }
    };

    let plot = plot_area(chart, &x_axis, &y_axis, width, height);
    ensure!(
        plot.width() >= MIN_PLOT_SIDE && plot.height() >= MIN_PLOT_SIDE,
        "a {width}x{height} image is too small for chart {:?}",
        chart.title
    );

    let mut img = RgbImage::from_pixel(width, height, WHITE);
    draw_axes(&mut img, chart, plot, &x_axis, &y_axis);

    // Lines may spill a little over the frame so that data on the range
    // boundary is drawn in full.
    let data_area = plot.grow(3);
    let mut ink = Mask::new(data_area);
    for (i, series_runs) in runs.iter().enumerate() {
        let mut mask = Mask::new(data_area);
        for run in series_runs {
            let mut pixels: Vec<(f64, f64)> = Vec::with_capacity(run.len());
            for (k, &(x, y)) in run.iter().enumerate() {
                let y = if chart.log_y { y.log10() } else { y };
                let p = plot.to_pixel(x_axis.frac(x), y_axis.frac(y));
                // A point within a quarter pixel of the last kept one stays
                // that close to the line drawn on from there: skip it, which
                // makes dense curves (many points per pixel) much cheaper.
                let near = |q: &(f64, f64)| (p.0 - q.0).powi(2) + (p.1 - q.1).powi(2) < 0.0625;
                if k + 1 < run.len() && pixels.last().is_some_and(near) {
                    continue;
                }
                pixels.push(p);
            }
            match pixels.as_slice() {
                [p] => mask.stroke(*p, *p, DOT_RADIUS),
                _ => {
                    for pair in pixels.windows(2) {
                        mask.stroke(pair[0], pair[1], LINE_HALF_WIDTH);
                    }
                }
            }
        }
        mask.paint(&mut img, PALETTE[i % PALETTE.len()]);
        ink.absorb(&mask);
    }
    if points().next().is_none() {
        let w = text_width("no data", 1);
        let (cx, cy) = plot.centre();
        draw_text(
            &mut img,
            cx - w / 2,
            cy - 4,
            "no data",
            1,
            MUTED,
            Dir::Right,
        );
    }
    draw_legend(&mut img, chart, plot, &ink);
    Ok(img)
}

/// Renders `chart` at [`DEFAULT_WIDTH`] × [`DEFAULT_HEIGHT`] and writes it to
/// `path` as a PNG, atomically (a temporary file in the same folder is
/// renamed over `path`).
pub fn save_png(chart: &Chart, path: &Path) -> Result<()> {
    write_png(&render(chart, DEFAULT_WIDTH, DEFAULT_HEIGHT)?, path)
}

/// Renders each chart at [`DEFAULT_WIDTH`] × [`DEFAULT_HEIGHT`], stacks them
/// top to bottom in one image and writes it to `path` as a PNG, atomically.
/// Fails for an empty `charts` or more panels than fit 32768 pixels.
pub fn save_panels(charts: &[Chart], path: &Path) -> Result<()> {
    ensure!(
        !charts.is_empty(),
        "no charts to draw in {}",
        path.display()
    );
    let height = u32::try_from(charts.len())
        .ok()
        .and_then(|n| n.checked_mul(DEFAULT_HEIGHT))
        .filter(|&h| h <= MAX_SIDE)
        .with_context(|| format!("too many panels ({}) for one image", charts.len()))?;
    let mut sheet = RgbImage::new(DEFAULT_WIDTH, height);
    for (i, chart) in charts.iter().enumerate() {
        let panel = render(chart, DEFAULT_WIDTH, DEFAULT_HEIGHT)?;
        // `i * DEFAULT_HEIGHT < height`, which fits a u32.
        sheet.copy_from(&panel, 0, i as u32 * DEFAULT_HEIGHT)?;
    }
    write_png(&sheet, path)
}

/// "Nice" tick values covering `[lo, hi]`: consecutive multiples of a step of
/// 1, 2 or 5 × 10^k, chosen to give about `target` intervals, from the last
/// multiple at or below `lo` to the first at or above `hi`.
///
/// Always returns at least two increasing values. The bounds may come in
/// either order; a degenerate range (`lo == hi`) is padded by 10% of its
/// value (or by 1 around zero); non-finite bounds give the ticks of `[0, 1]`.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (lo, hi) = widen(lo, hi);
    let target = target.max(2) as f64;
    // Divide before subtracting: `hi - lo` may overflow for huge bounds.
    ticks_with_step(lo, hi, nice_step(hi / target - lo / target))
}

/// Largest accepted image side, in pixels.
const MAX_SIDE: u32 = 1 << 15;
/// Smallest plot area side left after the margins, in pixels.
const MIN_PLOT_SIDE: i64 = 16;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const FRAME: Rgb<u8> = Rgb([70, 70, 70]);
const INK: Rgb<u8> = Rgb([25, 25, 25]);
const MUTED: Rgb<u8> = Rgb([140, 140, 140]);
const LEGEND_BORDER: Rgb<u8> = Rgb([190, 190, 190]);

/// Half the stroke width of series lines, in pixels.
const LINE_HALF_WIDTH: f64 = 1.0;
/// Radius of the dot drawn for an isolated point, in pixels.
const DOT_RADIUS: f64 = 2.5;
/// Length of the tick marks outside the frame, in pixels.
const TICK_LEN: i64 = 5;
/// Gap between a tick mark and its label, in pixels.
const TICK_GAP: i64 = 4;

/// Splits `points` into runs of consecutive drawable points: both coordinates
/// finite and, on a log axis, `y > 0`.
fn drawable_runs(points: &[(f64, f64)], log_y: bool) -> Vec<&[(f64, f64)]> {
    points
        .split(|&(x, y)| !(x.is_finite() && y.is_finite() && (!log_y || y > 0.0)))
        .filter(|run| !run.is_empty())
        .collect()
}

/// Smallest and largest of `values`, or `None` when there are none.
fn value_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |range, v| match range {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Orders `lo` and `hi` and pads a degenerate (or numerically degenerate)
/// range; non-finite bounds give `[0, 1]`.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    let mid = lo / 2.0 + hi / 2.0;
    if hi - lo > mid.abs() * 1e-9 {
        return (lo, hi);
    }
    let pad = if mid == 0.0 { 1.0 } else { mid.abs() * 0.1 };
    (mid - pad, mid + pad)
}

/// The 1, 2 or 5 × 10^k (or 10^(k+1)) closest to the positive step `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    let mantissa = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    mantissa * magnitude
}

/// Multiples of `step` from the last one at or below `lo` to the first at or
/// above `hi` (to within rounding, so that `[0, 5e-4]` with step `1e-4`
/// ends at `5e-4`); `[lo, hi]` when `step` is unusable or would give over
/// 1000 ticks.
fn ticks_with_step(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    const SLACK: f64 = 1e-9;
    let (first, last) = ((lo / step + SLACK).floor(), (hi / step - SLACK).ceil());
    let usable = step > 0.0 && step.is_finite() && first.is_finite() && last.is_finite();
    if !(usable && last > first && last - first <= 1000.0) {
        return vec![lo, hi];
    }
    (first as i64..=last as i64)
        .map(|i| i as f64 * step)
        .collect()
}

/// Formats tick value `v` of an axis whose ticks are `step` apart and whose
/// largest tick magnitude is `magnitude`: fixed point with just enough
/// decimals for `step`, or scientific notation (`2.5e-4`) for magnitudes of
/// a million and more or under 0.001.
fn format_tick(v: f64, step: f64, magnitude: f64) -> String {
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let step_decade = decade(step);
    if !(1e-3..1e6).contains(&magnitude) {
        let digits = (decade(magnitude) - step_decade).max(0) as usize;
        let text = format!("{v:.digits$e}");
        match text.split_once('e') {
            Some((mantissa, exp)) if mantissa.contains('.') => {
                let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
                format!("{mantissa}e{exp}")
            }
            _ => text,
        }
    } else {
        let decimals = (-step_decade).max(0) as usize;
        format!("{v:.decimals$}")
    }
}

/// The power of ten at or just below `|v|` (`k` in `v = m × 10^k`, `1 <= m < 10`),
/// tolerant of rounding just below an exact power.
fn decade(v: f64) -> i32 {
    (v.abs().log10() + 1e-9).floor() as i32
}

/// An axis in plotting space (`log10` of the values on a logarithmic axis):
/// its range and its labelled ticks.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// A linear axis over `[lo, hi]` widened to the outermost of about
    /// `target` nice ticks.
    fn linear(lo: f64, hi: f64, target: usize) -> Self {
        let values = nice_ticks(lo, hi, target);
        let step = values[1] - values[0];
        let magnitude = values.iter().fold(0f64, |m, v| m.max(v.abs()));
        Self {
            lo: values[0],
            hi: values[values.len() - 1],
            ticks: values
                .iter()
                .map(|&v| (v, format_tick(v, step, magnitude)))
                .collect(),
        }
    }

    /// A base-10 logarithmic axis over the positive values `[lo, hi]`.
    ///
    /// A range of a decade or more gets ticks at powers of ten (every few
    /// decades for wide ranges) and is widened to them; a narrower one gets
    /// linear nice ticks, widened to the outermost positive ones.
    fn log10(lo: f64, hi: f64, target: usize) -> Self {
        let (mut a, mut b) = (lo.log10(), hi.log10());
        if b - a < 1e-9 {
            a -= std::f64::consts::LOG10_2;
            b += std::f64::consts::LOG10_2;
        }
        if b - a >= 1.0 {
            let exponents = ticks_with_step(a, b, nice_step((b - a) / target as f64).max(1.0));
            let ticks: Vec<(f64, String)> = exponents
                .iter()
                .map(|&e| {
                    let v = 10f64.powi(e.round() as i32);
                    (e, format_tick(v, v, v))
                })
                .collect();
            return Self {
                lo: exponents[0],
                hi: exponents[exponents.len() - 1],
                ticks,
            };
        }
        let values = nice_ticks(10f64.powf(a), 10f64.powf(b), target);
        let step = values[1] - values[0];
        let magnitude = values.iter().fold(0f64, |m, v| m.max(v.abs()));
        let ticks: Vec<(f64, String)> = values
            .iter()
            .filter(|&&v| v > 0.0)
            .map(|&v| (v.log10(), format_tick(v, step, magnitude)))
            .collect();
        Self {
            lo: if values[0] > 0.0 {
                values[0].log10()
            } else {
                a
            },
            hi: ticks.last().map_or(b, |t| t.0.max(b)),
            ticks,
        }
    }

    /// Position of plotting-space value `v` along the axis: 0 at `lo`, 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        (v - self.lo) / (self.hi - self.lo)
    }
}

/// A rectangle of pixels, bounds inclusive.
#[derive(Debug, Clone, Copy)]
struct Rect {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Rect {
    fn width(self) -> i64 {
        self.right - self.left + 1
    }

    fn height(self) -> i64 {
        self.bottom - self.top + 1
    }

    fn centre(self) -> (i64, i64) {
        ((self.left + self.right) / 2, (self.top + self.bottom) / 2)
    }

    /// The rectangle extended by `by` pixels on every side.
    fn grow(self, by: i64) -> Self {
        Self {
            left: self.left - by,
            top: self.top - by,
            right: self.right + by,
            bottom: self.bottom + by,
        }
    }

    /// Pixel coordinates of fractional axis positions `(fx, fy)`: `(0, 0)` is
    /// the centre of the bottom-left frame pixel, `(1, 1)` of the top-right one.
    fn to_pixel(self, fx: f64, fy: f64) -> (f64, f64) {
        (
            self.left as f64 + 0.5 + fx * (self.right - self.left) as f64,
            self.bottom as f64 + 0.5 - fy * (self.bottom - self.top) as f64,
        )
    }
}

/// The frame of the plot area: the image less margins sized for the title,
/// axis labels and tick labels.
fn plot_area(chart: &Chart, x_axis: &Axis, y_axis: &Axis, width: u32, height: u32) -> Rect {
    let widest = |axis: &Axis| {
        let widths = axis.ticks.iter().map(|(_, label)| text_width(label, 1));
        widths.max().unwrap_or(0)
    };
    let last_x_label = x_axis.ticks.last().map_or(0, |(_, l)| text_width(l, 1));
    let title_h = if chart.title.is_empty() {
        0
    } else {
        2 * GLYPH_H + 10
    };
    let y_label_w = if chart.y_label.is_empty() {
        0
    } else {
        GLYPH_H + 8
    };
    let x_label_h = if chart.x_label.is_empty() {
        0
    } else {
        GLYPH_H + 8
    };
    Rect {
        left: 8 + y_label_w + widest(y_axis) + TICK_GAP + TICK_LEN,
        top: 12 + title_h,
        right: i64::from(width) - 1 - (last_x_label / 2 + 6).max(16),
        bottom: i64::from(height) - 1 - (TICK_LEN + TICK_GAP + GLYPH_H + x_label_h + 10),
    }
}

/// Draws grid lines, frame, ticks, tick labels, title and axis labels.
fn draw_axes(img: &mut RgbImage, chart: &Chart, plot: Rect, x_axis: &Axis, y_axis: &Axis) {
    let columns: Vec<(i64, &str)> = x_axis
        .ticks
        .iter()
        .map(|(v, label)| {
            (
                plot.to_pixel(x_axis.frac(*v), 0.0).0.floor() as i64,
                label.as_str(),
            )
        })
        .collect();
    let rows: Vec<(i64, &str)> = y_axis
        .ticks
        .iter()
        .map(|(v, label)| {
            (
                plot.to_pixel(0.0, y_axis.frac(*v)).1.floor() as i64,
                label.as_str(),
            )
        })
        .collect();
    for &(x, _) in &columns {
        fill(
            img,
            Rect {
                left: x,
                right: x,
                ..plot
            },
            GRID,
        );
    }
    for &(y, _) in &rows {
        fill(
            img,
            Rect {
                top: y,
                bottom: y,
                ..plot
            },
            GRID,
        );
    }
    for side in [
        Rect {
            right: plot.left,
            ..plot
        },
        Rect {
            left: plot.right,
            ..plot
        },
        Rect {
            bottom: plot.top,
            ..plot
        },
        Rect {
            top: plot.bottom,
            ..plot
        },
    ] {
        fill(img, side, FRAME);
    }

    let label_top = plot.bottom + TICK_LEN + TICK_GAP;
    for &(x, label) in &columns {
        let mark = Rect {
            left: x,
            top: plot.bottom + 1,
            right: x,
            bottom: plot.bottom + TICK_LEN,
        };
        fill(img, mark, FRAME);
        draw_text(
            img,
            x - text_width(label, 1) / 2,
            label_top,
            label,
            1,
            INK,
            Dir::Right,
        );
    }
    let label_right = plot.left - TICK_LEN - TICK_GAP;
    for &(y, label) in &rows {
        let mark = Rect {
            left: plot.left - TICK_LEN,
            top: y,
            right: plot.left - 1,
            bottom: y,
        };
        fill(img, mark, FRAME);
        // Digits span glyph rows 0..=6: centre them on the tick.
        draw_text(
            img,
            label_right - text_width(label, 1),
            y - 3,
            label,
            1,
            INK,
            Dir::Right,
        );
    }

    let title_w = text_width(&chart.title, 2);
    let title_x = ((i64::from(img.width()) - title_w) / 2).max(4);
    draw_text(img, title_x, 10, &chart.title, 2, INK, Dir::Right);
    let (cx, cy) = plot.centre();
    let x_label_top = label_top + GLYPH_H + 8;
    let x_label_w = text_width(&chart.x_label, 1);
    draw_text(
        img,
        cx - x_label_w / 2,
        x_label_top,
        &chart.x_label,
        1,
        INK,
        Dir::Right,
    );
    let y_label_w = text_width(&chart.y_label, 1);
    draw_text(img, 8, cy + y_label_w / 2, &chart.y_label, 1, INK, Dir::Up);
}

/// Draws the legend in the corner of the plot area that hides the least
/// data (`ink`): one row per named series, a colour swatch and the name,
/// names shortened and rows cut (ending in "+N more") to fit the plot.
fn draw_legend(img: &mut RgbImage, chart: &Chart, plot: Rect, ink: &Mask) {
    const PAD: i64 = 6;
    const SWATCH: i64 = 18;
    const ROW: i64 = 12;
    const INSET: i64 = 8;
    let max_chars = ((plot.width() - 2 * INSET - 2 * PAD - SWATCH - 6) / CHAR_ADVANCE).max(1);
    let max_rows = ((plot.height() - 2 * INSET - 2 * PAD + ROW - GLYPH_H) / ROW).max(1);
    let mut rows: Vec<(Option<Rgb<u8>>, String)> = chart
        .series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.name.is_empty())
        .map(|(i, s)| {
            let colour = PALETTE[i % PALETTE.len()];
            (Some(colour), shorten(&s.name, max_chars as usize))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    if rows.len() as i64 > max_rows {
        let shown = max_rows as usize - 1;
        let hidden = rows.len() - shown;
        rows.truncate(shown);
        rows.push((None, format!("+{hidden} more")));
    }

    let text_w = rows
        .iter()
        .map(|(_, name)| text_width(name, 1))
        .max()
        .unwrap_or(0);
    let w = 2 * PAD + SWATCH + 6 + text_w;
    let h = 2 * PAD + rows.len() as i64 * ROW - (ROW - GLYPH_H);
    let at = |left: i64, top: i64| Rect {
        left,
        top,
        right: left + w - 1,
        bottom: top + h - 1,
    };
    let (left, right) = (plot.left + INSET, plot.right - INSET - w + 1);
    let (top, bottom) = (plot.top + INSET, plot.bottom - INSET - h + 1);
    let candidates = [
        at(right, top),
        at(left, top),
        at(right, bottom),
        at(left, bottom),
    ];
    let frame = candidates
        .into_iter()
        .map(|rect| (ink.sum(rect), rect))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map_or(candidates[0], |(_, rect)| rect);

    fill(img, frame, LEGEND_BORDER);
    fill(img, frame.grow(-1), WHITE);
    for (i, (colour, name)) in rows.iter().enumerate() {
        let y = frame.top + PAD + i as i64 * ROW;
        let x = frame.left + PAD;
        if let Some(colour) = *colour {
            fill(
                img,
                Rect {
                    left: x,
                    top: y + 2,
                    right: x + SWATCH - 1,
                    bottom: y + 4,
                },
                colour,
            );
        }
        draw_text(img, x + SWATCH + 6, y, name, 1, INK, Dir::Right);
    }
}

/// `name` cut to at most `max_chars` characters, ending in ".." when cut.
fn shorten(name: &str, max_chars: usize) -> String {
    if name.chars().count() <= max_chars {
        return name.to_owned();
    }
    if max_chars < 3 {
        return name.chars().take(max_chars).collect();
    }
    let mut short: String = name.chars().take(max_chars - 2).collect();
    short.push_str("..");
    short
}

/// Fills `rect` with `colour`, clipped to the image.
fn fill(img: &mut RgbImage, rect: Rect, colour: Rgb<u8>) {
    let left = rect.left.max(0);
    let top = rect.top.max(0);
    let right = rect.right.min(i64::from(img.width()) - 1);
    let bottom = rect.bottom.min(i64::from(img.height()) - 1);
    for y in top..=bottom {
        for x in left..=right {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

/// Anti-aliased coverage (0 to 1) of the pixels of a rectangle.
struct Mask {
    area: Rect,
    coverage: Vec<f32>,
}

impl Mask {
    fn new(area: Rect) -> Self {
        let len = (area.width().max(0) * area.height().max(0)) as usize;
        Self {
            area,
            coverage: vec![0.0; len],
        }
    }

    /// Index of pixel `(x, y)` in `coverage`, if inside the area.
    fn index(&self, x: i64, y: i64) -> Option<usize> {
        let a = self.area;
        let inside = (a.left..=a.right).contains(&x) && (a.top..=a.bottom).contains(&y);
        inside.then(|| ((y - a.top) * a.width() + (x - a.left)) as usize)
    }

    /// Covers the capsule of radius `half_width` around segment `a`–`b`
    /// (pixel coordinates, pixel `(i, j)` spans `[i, i + 1) × [j, j + 1)`),
    /// with a one-pixel anti-aliased edge. Overlaps keep the larger coverage,
    /// so joints of a polyline are not darkened.
    fn stroke(&mut self, a: (f64, f64), b: (f64, f64), half_width: f64) {
        // Walk the axis along which the segment advances faster ("major"),
        // visiting on each step only the pixels near the line across it.
        let steep = (b.1 - a.1).abs() > (b.0 - a.0).abs();
        let swap = |p: (f64, f64)| if steep { (p.1, p.0) } else { p };
        let ((a_major, a_minor), (b_major, b_minor)) = (swap(a), swap(b));
        let slope = if b_major == a_major {
            0.0
        } else {
            (b_minor - a_minor) / (b_major - a_major)
        };
        let reach = half_width + 1.0;
        let across = half_width * (1.0 + slope * slope).sqrt() + 1.0;
        let (minor_lo, minor_hi) = (a_minor.min(b_minor), a_minor.max(b_minor));
        let (area_lo, area_hi) = if steep {
            (self.area.top, self.area.bottom)
        } else {
            (self.area.left, self.area.right)
        };
        let first = ((a_major.min(b_major) - reach).floor() as i64).max(area_lo);
        let last = ((a_major.max(b_major) + reach).ceil() as i64).min(area_hi);
        for major in first..=last {
            let centre = major as f64 + 0.5;
            let minor = (a_minor + (centre - a_major) * slope).clamp(minor_lo, minor_hi);
            let (lo, hi) = (
                (minor - across).floor() as i64,
                (minor + across).ceil() as i64,
            );
            for minor in lo..=hi {
                let (x, y) = if steep {
                    (minor, major)
                } else {
                    (major, minor)
                };
                let Some(i) = self.index(x, y) else { continue };
                let d = segment_distance((x as f64 + 0.5, y as f64 + 0.5), a, b);
                let c = (half_width + 0.5 - d).clamp(0.0, 1.0) as f32;
                self.coverage[i] = self.coverage[i].max(c);
            }
        }
    }

    /// Blends `colour` over the image in proportion to the coverage.
    fn paint(&self, img: &mut RgbImage, colour: Rgb<u8>) {
        let (w, h) = (i64::from(img.width()), i64::from(img.height()));
        for y in self.area.top.max(0)..=self.area.bottom.min(h - 1) {
            for x in self.area.left.max(0)..=self.area.right.min(w - 1) {
                let Some(i) = self.index(x, y) else { continue };
                let c = self.coverage[i];
                if c > 0.0 {
                    let pixel = img.get_pixel_mut(x as u32, y as u32);
                    for (p, q) in pixel.0.iter_mut().zip(colour.0) {
                        *p = (f32::from(*p) * (1.0 - c) + f32::from(q) * c).round() as u8;
                    }
                }
            }
        }
    }

    /// Keeps, per pixel, the larger of this mask's and `other`'s coverage
    /// (both must cover the same area).
    fn absorb(&mut self, other: &Mask) {
        for (c, o) in self.coverage.iter_mut().zip(&other.coverage) {
            *c = c.max(*o);
        }
    }

    /// Total coverage inside `rect`.
    fn sum(&self, rect: Rect) -> f32 {
        let mut total = 0.0;
        for y in rect.top..=rect.bottom {
            for x in rect.left..=rect.right {
                total += self.index(x, y).map_or(0.0, |i| self.coverage[i]);
            }
        }
        total
    }
}

/// Distance from point `p` to the segment `a`–`b`.
fn segment_distance(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (ex, ey) = (p.0 - a.0 - t * dx, p.1 - a.1 - t * dy);
    (ex * ex + ey * ey).sqrt()
}

/// Direction of a run of text.
#[derive(Debug, Clone, Copy)]
enum Dir {
    /// Left to right; the anchor is the top-left corner.
    Right,
    /// Bottom to top (rotated a quarter turn anticlockwise); the anchor is
    /// the bottom-left corner.
    Up,
}

/// Draws `text` with the bitmap font at `scale` pixels per font pixel,
/// clipped to the image. Characters outside printable ASCII draw as `?`.
fn draw_text(
    img: &mut RgbImage,
    x: i64,
    y: i64,
    text: &str,
    scale: i64,
    colour: Rgb<u8>,
    dir: Dir,
) {
    for (n, ch) in text.chars().enumerate() {
        let origin = n as i64 * CHAR_ADVANCE;
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - col)) == 0 {
                    continue;
                }
                // Position of the font pixel in unrotated text space, scaled.
                let (tx, ty) = ((origin + col) * scale, row as i64 * scale);
                let (left, top) = match dir {
                    Dir::Right => (x + tx, y + ty),
                    Dir::Up => (x + ty, y - tx - scale + 1),
                };
                let block = Rect {
                    left,
                    top,
                    right: left + scale - 1,
                    bottom: top + scale - 1,
                };
                fill(img, block, colour);
            }
        }
    }
}

/// Width in pixels of `text` drawn at `scale` (no trailing gap).
fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    (n * CHAR_ADVANCE - 1).max(0) * scale
}

/// Glyph of `ch`; `?` for characters outside printable ASCII.
fn glyph(ch: char) -> &'static [u8; GLYPH_H as usize] {
    let index = if (' '..='~').contains(&ch) {
        ch as usize
    } else {
        '?' as usize
    };
    &FONT[index - ' ' as usize]
}

/// Font pixels per glyph row (bit 4 of a row is the leftmost pixel).
const GLYPH_W: i64 = 5;
/// Rows per glyph: capitals and digits use rows 0 to 6, descenders row 7.
const GLYPH_H: i64 = 8;
/// Horizontal distance between consecutive characters.
const CHAR_ADVANCE: i64 = GLYPH_W + 1;

/// 5×8 bitmap glyphs for ASCII 32 (space) to 126 (`~`), one row a byte.
#[rustfmt::skip]
const FONT: [[u8; GLYPH_H as usize]; 95] = [
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // ' '
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100, 0b00000], // '!'
    [0b01010, 0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '"'
    [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010, 0b00000], // '#'
    [0b00100, 0b01111, 0b10100, 0b01110, 0b00101, 0b11110, 0b00100, 0b00000], // '$'
    [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011, 0b00000], // '%'
    [0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101, 0b00000], // '&'
    [0b00100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '''
    [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010, 0b00000], // '('
    [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000, 0b00000], // ')'
    [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000, 0b00000], // '*'
    [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000, 0b00000], // '+'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000], // ','
    [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000, 0b00000], // '-'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00000], // '.'
    [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000, 0b00000], // '/'
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110, 0b00000], // '0'
    [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // '1'
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000], // '2'
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110, 0b00000], // '3'
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010, 0b00000], // '4'
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110, 0b00000], // '5'
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110, 0b00000], // '6'
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00000], // '7'
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110, 0b00000], // '8'
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100, 0b00000], // '9'
    [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000, 0b00000], // ':'
    [0b00000, 0b01100, 0b01100, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000], // ';'
    [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00000], // '<'
    [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000], // '='
    [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000, 0b00000], // '>'
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100, 0b00000], // '?'
    [0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110, 0b00000], // '@'
    [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000], // 'A'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110, 0b00000], // 'B'
    [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000], // 'C'
    [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100, 0b00000], // 'D'
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111, 0b00000], // 'E'
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000], // 'F'
    [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111, 0b00000], // 'G'
    [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001, 0b00000], // 'H'
    [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // 'I'
    [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100, 0b00000], // 'J'
    [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001, 0b00000], // 'K'
    [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111, 0b00000], // 'L'
    [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001, 0b00000], // 'M'
    [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001, 0b00000], // 'N'
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // 'O'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000, 0b00000], // 'P'
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101, 0b00000], // 'Q'
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001, 0b00000], // 'R'
    [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110, 0b00000], // 'S'
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000], // 'T'
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // 'U'
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000], // 'V'
    [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010, 0b00000], // 'W'
    [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001, 0b00000], // 'X'
    [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00000], // 'Y'
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111, 0b00000], // 'Z'
    [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110, 0b00000], // '['
    [0b00000, 0b10000, 0b01000, 0b00100, 0b00010, 0b00001, 0b00000, 0b00000], // '\'
    [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110, 0b00000], // ']'
    [0b00100, 0b01010, 0b10001, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '^'
    [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111], // '_'
    [0b01000, 0b00100, 0b00010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000], // '`'
    [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111, 0b00000], // 'a'
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110, 0b00000], // 'b'
    [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110, 0b00000], // 'c'
    [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111, 0b00000], // 'd'
    [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110, 0b00000], // 'e'
    [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000, 0b00000], // 'f'
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // 'g'
    [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000], // 'h'
    [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // 'i'
    [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100], // 'j'
    [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b00000], // 'k'
    [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110, 0b00000], // 'l'
    [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10101, 0b10101, 0b00000], // 'm'
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001, 0b00000], // 'n'
    [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110, 0b00000], // 'o'
    [0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000], // 'p'
    [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001], // 'q'
    [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000, 0b00000], // 'r'
    [0b00000, 0b00000, 0b01111, 0b10000, 0b01110, 0b00001, 0b11110, 0b00000], // 's'
    [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110, 0b00000], // 't'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101, 0b00000], // 'u'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00000], // 'v'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010, 0b00000], // 'w'
    [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b00000], // 'x'
    [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110], // 'y'
    [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111, 0b00000], // 'z'
    [0b00010, 0b00100, 0b00100, 0b01000, 0b00100, 0b00100, 0b00010, 0b00000], // '{'
    [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000], // '|'
    [0b01000, 0b00100, 0b00100, 0b00010, 0b00100, 0b00100, 0b01000, 0b00000], // '}'
    [0b00000, 0b00000, 0b01000, 0b10101, 0b00010, 0b00000, 0b00000, 0b00000], // '~'
];

/// Encodes `img` as PNG in memory and writes it to `path` atomically.
fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("cannot encode PNG")?;
    crate::util::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `ticks` cover `[lo, hi]` with a 1/2/5 × 10^k step.
    fn assert_nice_cover(ticks: &[f64], lo: f64, hi: f64) {
        assert!(ticks.len() >= 2, "{ticks:?}");
        let step = ticks[1] - ticks[0];
        let slack = step * 1e-6;
        assert!(
            ticks[0] <= lo + slack && *ticks.last().unwrap() >= hi - slack,
            "{ticks:?} vs [{lo}, {hi}]"
        );
        let mantissa = step / 10f64.powi(decade(step));
        assert!(
            [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6),
            "step {step} of {ticks:?}"
        );
        for pair in ticks.windows(2) {
            assert!(
                ((pair[1] - pair[0]) - step).abs() <= step * 1e-6,
                "{ticks:?}"
            );
        }
        // Ticks sit on multiples of the step.
        for t in ticks {
            assert!(
                (t / step - (t / step).round()).abs() < 1e-6,
                "{t} in {ticks:?}"
            );
        }
    }

    #[test]
    fn nice_ticks_cover_range_with_nice_steps() {
        let ranges = [
            (0.0, 1.0),
            (0.0, 100.0),
            (-3.7, 12.2),
            (0.001, 0.0042),
            (1e6, 3.5e6),
            (-1e-5, -1e-6),
            (17.0, 18.3),
            (0.05, 7.3),
        ];
        for (lo, hi) in ranges {
            let ticks = nice_ticks(lo, hi, 5);
            assert_nice_cover(&ticks, lo, hi);
            assert!(
                (4..=11).contains(&ticks.len()),
                "{ticks:?} for [{lo}, {hi}]"
            );
        }
        assert_eq!(
            nice_ticks(0.0, 100.0, 5),
            [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        // Swapped bounds are ordered.
        assert_nice_cover(&nice_ticks(10.0, -2.0, 5), -2.0, 10.0);
    }

    #[test]
    fn nice_ticks_pad_degenerate_ranges() {
        for v in [5.0, 0.0, -3.0, 1e-12, 1e12] {
            let ticks = nice_ticks(v, v, 5);
            assert_nice_cover(&ticks, v, v);
            assert!(
                ticks[0] < v && *ticks.last().unwrap() > v,
                "{ticks:?} around {v}"
            );
        }
        // A range below float resolution counts as degenerate.
        let ticks = nice_ticks(1.0, 1.0 + 1e-15, 5);
        assert!(ticks[0] < 1.0 && *ticks.last().unwrap() > 1.0, "{ticks:?}");
        // Non-finite bounds fall back to [0, 1].
        assert_eq!(nice_ticks(f64::NAN, 1.0, 5), nice_ticks(0.0, 1.0, 5));
        assert_eq!(nice_ticks(0.0, f64::INFINITY, 5), nice_ticks(0.0, 1.0, 5));
        // Huge spans do not overflow.
        let ticks = nice_ticks(-1e308, 1e308, 5);
        assert!(ticks.iter().all(|t| t.is_finite()), "{ticks:?}");
        assert!(ticks[0] <= -1e308 && *ticks.last().unwrap() >= 1e308);
    }

    #[test]
    fn tick_labels_are_short_and_exact() {
        let labels = |lo, hi| {
            Axis::linear(lo, hi, 5)
                .ticks
                .into_iter()
                .map(|t| t.1)
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(0.0, 1.0), ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(labels(0.0, 100.0), ["0", "20", "40", "60", "80", "100"]);
        assert_eq!(
            labels(0.0, 5e-4),
            ["0", "1e-4", "2e-4", "3e-4", "4e-4", "5e-4"]
        );
        assert_eq!(
            labels(0.0, 250_000.0),
            ["0", "50000", "100000", "150000", "200000", "250000"]
        );
        assert_eq!(labels(1e6, 2e6)[1], "1.2e6");
        assert_eq!(labels(-1.0, 1.0)[0], "-1.0");
    }

    #[test]
    fn log_axis_uses_decades_or_linear_ticks() {
        let axis = Axis::log10(1e-4, 0.5, 5);
        let positions: Vec<f64> = axis.ticks.iter().map(|t| t.0).collect();
        assert_eq!(positions, [-4.0, -3.0, -2.0, -1.0, 0.0]);
        let labels: Vec<&str> = axis.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["1e-4", "0.001", "0.01", "0.1", "1"]);
        assert_eq!((axis.lo, axis.hi), (-4.0, 0.0));

        // Many decades: a tick every few decades, still covering the range.
        let wide = Axis::log10(1e-30, 1e10, 5);
        assert!(wide.ticks.len() <= 11 && wide.lo <= -30.0 && wide.hi >= 10.0);

        // Under a decade: linear ticks, all positive, inside the axis range.
        let narrow = Axis::log10(2e-4, 8e-4, 5);
        assert!(narrow.ticks.len() >= 3);
        assert!(narrow.lo <= 2e-4f64.log10() && narrow.hi >= 8e-4f64.log10());
        for (t, label) in &narrow.ticks {
            assert!((narrow.lo..=narrow.hi).contains(t), "{t} ({label})");
        }

        // A constant value gets a range around it.
        let constant = Axis::log10(3.0, 3.0, 5);
        assert!(constant.lo < 3f64.log10() && constant.hi > 3f64.log10());
        assert!(constant.ticks.len() >= 2);
    }

    #[test]
    fn font_glyphs_fit_their_cell() {
        for (i, glyph) in FONT.iter().enumerate() {
            assert!(glyph.iter().all(|row| row >> GLYPH_W == 0), "glyph {i}");
            let has_ink = glyph.iter().any(|&row| row != 0);
            assert_eq!(has_ink, i != 0, "glyph {:?}", char::from(b' ' + i as u8));
        }
        assert_eq!(glyph('é'), glyph('?'));
        assert_eq!(text_width("", 1), 0);
        assert_eq!(text_width("ab", 2), 22);
    }

    #[test]
    fn stroke_is_solid_on_the_line_and_empty_away_from_it() {
        let mut mask = Mask::new(Rect {
            left: 0,
            top: 0,
            right: 19,
            bottom: 19,
        });
        mask.stroke((2.5, 10.5), (17.5, 10.5), LINE_HALF_WIDTH);
        let at = |x, y| mask.coverage[mask.index(x, y).unwrap()];
        assert_eq!(at(10, 10), 1.0);
        assert!(at(10, 11) > 0.0 && at(10, 9) > 0.0);
        assert_eq!(at(10, 13), 0.0);
        assert_eq!(at(10, 2), 0.0);
        // About two pixels of ink per column.
        let column: f32 = (0..20).map(|y| at(10, y)).sum();
        assert!((column - 2.0).abs() < 0.01, "{column}");
    }

    #[test]
    fn shorten_marks_cut_names() {
        assert_eq!(shorten("loss", 10), "loss");
        assert_eq!(shorten("training loss", 8), "traini..");
        assert_eq!(shorten("loss", 2), "lo");
    }
}
