//! PNG line charts of training curves (loss, accuracy, learning rate,
//! codebook usage), drawn with `plotters` on its bitmap backend. Text is set
//! in DejaVu Sans, bundled in the binary (`assets/fonts/`), so no system font
//! is looked up.
//!
//! A [`Chart`] holds named [`Series`] of `(x, y)` points, drawn as 2 px lines
//! in the colours of [`PALETTE`] on a white image with a light grid, tick
//! labels, a title, axis labels and a legend of the named series.
//!
//! Points with a non-finite coordinate (and, on a logarithmic y axis, points
//! with `y <= 0`) are skipped and break the line, so gaps stay visible. A
//! point with no drawable neighbour is drawn as a dot. Empty, constant or
//! single-point data get a padded range instead of an error.

use anyhow::{Context, Result, ensure};
use image::{GenericImage, Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

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

/// Largest image side accepted.
const MAX_SIDE: u32 = 32768;
/// Smallest plot area (inside the axes) worth drawing.
const MIN_PLOT_SIDE: u32 = 40;

/// DejaVu Sans (Bitstream Vera licence, see `assets/fonts/LICENSE`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the bundled font could not be loaded; charts will have no text");
        }
    });
}

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
    /// Drawn centred above the plot; may be empty.
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

/// The drawable stretches of `points` (already mapped to the y scale):
/// maximal runs of consecutive finite points.
fn drawable_runs(points: &[(f64, f64)], log_y: bool) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for &(x, y) in points {
        let y = if log_y {
            if y > 0.0 { y.log10() } else { f64::NAN }
        } else {
            y
        };
        if x.is_finite() && y.is_finite() {
            run.push((x, y));
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// `[lo, hi]` of `values` with a margin of 3% (a degenerate range padded by
/// 10% of its value, or by 1 around zero); `[0, 1]` without values.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (0.0, 1.0);
    }
    // Halve before subtracting so that ±1e300 does not overflow.
    let half = hi / 2.0 - lo / 2.0;
    if half.is_nan() || half <= f64::EPSILON * lo.abs().max(hi.abs()) {
        let pad = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        return (lo - pad, hi + pad);
    }
    let margin = 0.06 * half;
    ((lo - margin).max(-f64::MAX), (hi + margin).min(f64::MAX))
}

/// A tick label: compact, without trailing zeros.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" { "0".into() } else { s.into() }
    }
}

fn rgb(c: Rgb<u8>) -> RGBColor {
    RGBColor(c.0[0], c.0[1], c.0[2])
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
    register_font();
    // Text and margins scale with the image, within limits.
    let unit = (f64::from(width.min(height)) / 540.0).clamp(0.5, 2.0);
    let px = |v: f64| (v * unit).round() as u32;
    let (caption, label, x_area, y_area, margin) =
        (px(22.0), px(15.0), px(42.0), px(70.0), px(12.0));
    let title_h = if chart.title.is_empty() {
        0
    } else {
        caption + margin
    };
    ensure!(
        width >= y_area + 2 * margin + MIN_PLOT_SIDE
            && height >= x_area + title_h + 2 * margin + MIN_PLOT_SIDE,
        "a {width}x{height} image is too small for chart {:?}",
        chart.title
    );
    let runs: Vec<Vec<Vec<(f64, f64)>>> = chart
        .series
        .iter()
        .map(|s| drawable_runs(&s.points, chart.log_y))
        .collect();
    let points = || runs.iter().flatten().flatten();
    let (x0, x1) = padded_range(points().map(|p| p.0));
    let (y0, y1) = padded_range(points().map(|p| p.1));

    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let draw_err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the chart: {e}");
        let mut cc = ChartBuilder::on(&root)
            .caption(&chart.title, (FAMILY, caption))
            .margin(margin)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| draw_err(&e))?;
        let log_y = chart.log_y;
        let y_fmt = move |v: &f64| {
            if log_y {
                tick_label(10f64.powf(*v))
            } else {
                tick_label(*v)
            }
        };
        cc.configure_mesh()
            .x_desc(&chart.x_label)
            .y_desc(&chart.y_label)
            .label_style((FAMILY, label))
            .axis_desc_style((FAMILY, label))
            .x_labels((width / 150).clamp(2, 10) as usize)
            .y_labels((height / 90).clamp(2, 10) as usize)
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&y_fmt)
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(RGBColor(245, 245, 245))
            .draw()
            .map_err(|e| draw_err(&e))?;
        let mut legend = false;
        for (i, series_runs) in runs.iter().enumerate() {
            let colour = rgb(PALETTE[i % PALETTE.len()]);
            let name = &chart.series[i].name;
            for (k, run) in series_runs.iter().enumerate() {
                let anno = if run.len() == 1 {
                    cc.draw_series(std::iter::once(Circle::new(run[0], 3, colour.filled())))
                } else {
                    cc.draw_series(LineSeries::new(run.iter().copied(), colour.stroke_width(2)))
                }
                .map_err(|e| draw_err(&e))?;
                if k == 0 && !name.is_empty() {
                    legend = true;
                    anno.label(name.as_str()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                }
            }
        }
        if legend {
            cc.configure_series_labels()
                .label_font((FAMILY, label))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| draw_err(&e))?;
        }
        if points().next().is_none() {
            let (w, h) = (width as i32, height as i32);
            root.draw(&Text::new(
                "no data",
                (w / 2 - px(28.0) as i32, h / 2),
                (FAMILY, label).into_font().color(&RGBColor(120, 120, 120)),
            ))
            .map_err(|e| draw_err(&e))?;
        }
        root.present().map_err(|e| draw_err(&e))?;
    }
    RgbImage::from_raw(width, height, buf).context("chart buffer has the wrong size")
}

/// Writes `img` to `path` as a PNG, atomically.
pub(crate) fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .with_context(|| format!("encoding {}", path.display()))?;
    crate::util::write_atomic(path, &bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_padded_and_finite() {
        assert_eq!(padded_range([].into_iter()), (0.0, 1.0));
        assert_eq!(padded_range([0.0].into_iter()), (-1.0, 1.0));
        let (lo, hi) = padded_range([5.0, 5.0].into_iter());
        assert!(lo < 5.0 && hi > 5.0);
        let (lo, hi) = padded_range([-1e300, 1e300].into_iter());
        assert!(lo.is_finite() && hi.is_finite() && lo < -1e300 && hi > 1e300);
        let (lo, hi) = padded_range([0.0, 10.0].into_iter());
        assert!((lo + 0.3).abs() < 1e-12 && (hi - 10.3).abs() < 1e-12);
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(1000.0), "1000");
        assert_eq!(tick_label(1.5e-5), "1.5e-5");
        assert_eq!(tick_label(-0.00001), "-1.0e-5");
    }
}
