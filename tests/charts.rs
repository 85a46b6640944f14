//! Training-curve charts: image size, where series pixels land, robustness
//! to awkward data, and PNG output.

use beitv2::train::charts::{
    Chart, DEFAULT_HEIGHT, DEFAULT_WIDTH, PALETTE, Series, render, save_panels, save_png,
};
use image::{Rgb, RgbImage};
use std::path::PathBuf;

/// A chart with no labels and the given series.
fn chart(series: Vec<Series>, log_y: bool) -> Chart {
    Chart {
        series,
        log_y,
        ..Chart::default()
    }
}

/// Whether `pixel` is mostly `colour`: at least half-way from white to
/// `colour` along the blend line, and close to that line (which rules out the
/// greys of grid, frame and text, and other palette colours).
fn is_colour(pixel: Rgb<u8>, colour: Rgb<u8>) -> bool {
    let dir = colour.0.map(|c| f32::from(c) - 255.0);
    let off = pixel.0.map(|p| f32::from(p) - 255.0);
    let dot = |u: [f32; 3], v: [f32; 3]| u[0] * v[0] + u[1] * v[1] + u[2] * v[2];
    let t = dot(dir, off) / dot(dir, dir);
    let residual = [0, 1, 2].map(|i| off[i] - t * dir[i]);
    t >= 0.5 && dot(residual, residual) < 30.0 * 30.0
}

/// Pixels of `img` that are mostly `colour`.
fn pixels_of(img: &RgbImage, colour: Rgb<u8>) -> Vec<(u32, u32)> {
    img.enumerate_pixels()
        .filter(|(_, _, p)| is_colour(**p, colour))
        .map(|(x, y, _)| (x, y))
        .collect()
}

/// `pixels` as positions `(u, v)` within their bounding box, `v` pointing up.
fn normalised(pixels: &[(u32, u32)]) -> Vec<(f64, f64)> {
    let (x0, x1) = (
        pixels.iter().map(|p| p.0).min().unwrap(),
        pixels.iter().map(|p| p.0).max().unwrap(),
    );
    let (y0, y1) = (
        pixels.iter().map(|p| p.1).min().unwrap(),
        pixels.iter().map(|p| p.1).max().unwrap(),
    );
    pixels
        .iter()
        .map(|&(x, y)| {
            (
                f64::from(x - x0) / f64::from(x1 - x0),
                f64::from(y1 - y) / f64::from(y1 - y0),
            )
        })
        .collect()
}

/// Asserts that `pixels` trace the rising diagonal of their bounding box
/// without large gaps, and that the bounding box is a large part of the
/// image yet leaves margins for axes and labels.
fn assert_rising_diagonal(img: &RgbImage, pixels: &[(u32, u32)]) {
    assert!(!pixels.is_empty(), "series colour not drawn");
    let (w, h) = img.dimensions();
    let left = pixels.iter().map(|p| p.0).min().unwrap();
    let right = pixels.iter().map(|p| p.0).max().unwrap();
    let top = pixels.iter().map(|p| p.1).min().unwrap();
    let bottom = pixels.iter().map(|p| p.1).max().unwrap();
    assert!(
        left > 20 && bottom < h - 20 && top > 10 && right < w - 5,
        "no margins"
    );
    assert!(
        right - left > w / 2 && bottom - top > h / 2,
        "plot too small"
    );

    let uv = normalised(pixels);
    for &(u, v) in &uv {
        assert!(
            (u - v).abs() < 0.05,
            "pixel off the diagonal at ({u:.2}, {v:.2})"
        );
    }
    // Nothing in the top-left or bottom-right corners.
    assert!(!uv.iter().any(|&(u, v)| u < 0.3 && v > 0.7));
    assert!(!uv.iter().any(|&(u, v)| u > 0.7 && v < 0.3));
    // Continuous along the diagonal.
    for i in 0..50 {
        let t = f64::from(i) / 49.0;
        assert!(
            uv.iter().any(|&(u, _)| (u - t).abs() < 0.02),
            "gap near u = {t:.2}"
        );
    }
}

#[test]
fn render_has_requested_size() {
    let c = Chart {
        title: "Loss".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: vec![Series::new(
            "train",
            vec![(0.0, 2.0), (1.0, 1.0), (2.0, 0.5)],
        )],
        log_y: false,
    };
    for (w, h) in [(900, 540), (320, 200), (1600, 300), (160, 120)] {
        let img = render(&c, w, h).unwrap();
        assert_eq!(img.dimensions(), (w, h));
    }
}

#[test]
fn identity_line_follows_the_diagonal() {
    let points = (0..=100).map(|i| (f64::from(i), f64::from(i))).collect();
    // No name: no legend, so only the line carries the series colour.
    let img = render(&chart(vec![Series::new("", points)], false), 900, 540).unwrap();
    assert_rising_diagonal(&img, &pixels_of(&img, PALETTE[0]));
}

#[test]
fn log_axis_straightens_exponential_growth() {
    let points = (0..=40)
        .map(|i| (f64::from(i), 10f64.powf(f64::from(i) / 10.0)))
        .collect();
    let img = render(&chart(vec![Series::new("", points)], true), 900, 540).unwrap();
    assert_rising_diagonal(&img, &pixels_of(&img, PALETTE[0]));
}

#[test]
fn larger_values_are_drawn_higher() {
    let low = Series::new("", vec![(0.0, 0.0), (10.0, 0.0)]);
    let high = Series::new("", vec![(0.0, 10.0), (10.0, 10.0)]);
    let img = render(&chart(vec![low, high], false), 900, 540).unwrap();
    let low_rows: Vec<u32> = pixels_of(&img, PALETTE[0]).iter().map(|p| p.1).collect();
    let high_rows: Vec<u32> = pixels_of(&img, PALETTE[1]).iter().map(|p| p.1).collect();
    assert!(!low_rows.is_empty() && !high_rows.is_empty());
    assert!(high_rows.iter().max() < low_rows.iter().min());
}

#[test]
fn non_finite_points_leave_a_gap() {
    let points = (0..=100)
        .map(|i| {
            let y = if (40..=60).contains(&i) {
                f64::NAN
            } else {
                f64::from(i)
            };
            (f64::from(i), y)
        })
        .collect();
    let img = render(&chart(vec![Series::new("", points)], false), 900, 540).unwrap();
    let uv = normalised(&pixels_of(&img, PALETTE[0]));
    assert!(uv.iter().any(|&(u, _)| u < 0.35) && uv.iter().any(|&(u, _)| u > 0.65));
    assert!(
        !uv.iter().any(|&(u, _)| (0.42..=0.58).contains(&u)),
        "gap was bridged"
    );
}

#[test]
fn single_point_is_visible() {
    let img = render(
        &chart(vec![Series::new("", vec![(3.0, 7.0)])], false),
        900,
        540,
    )
    .unwrap();
    let pixels = pixels_of(&img, PALETTE[0]);
    assert!(pixels.len() >= 9, "{} pixels", pixels.len());
    // Drawn as a small dot, not a line.
    let xs: Vec<u32> = pixels.iter().map(|p| p.0).collect();
    assert!(xs.iter().max().unwrap() - xs.iter().min().unwrap() <= 6);
}

#[test]
fn legend_shows_each_named_series_colour() {
    let series = (0..3)
        .map(|k| {
            let points = (0..50).map(|i| (f64::from(i), f64::from(i * k))).collect();
            Series::new(format!("series {k}"), points)
        })
        .collect();
    let img = render(&chart(series, false), 900, 540).unwrap();
    for colour in &PALETTE[..3] {
        assert!(!pixels_of(&img, *colour).is_empty(), "{colour:?} missing");
    }
    assert!(pixels_of(&img, PALETTE[3]).is_empty());
}

#[test]
fn awkward_data_renders_without_panicking() {
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    let long_name = "a very long series name that does not fit in any legend at all".repeat(3);
    let cases: Vec<(Vec<Series>, bool)> = vec![
        (vec![], false),
        (vec![], true),
        (vec![Series::new("empty", vec![])], false),
        (
            vec![Series::new("nan", vec![(nan, nan), (1.0, nan), (nan, 2.0)])],
            false,
        ),
        (vec![Series::new("one", vec![(5.0, 5.0)])], true),
        (
            vec![Series::new(
                "flat",
                vec![(0.0, 3.0), (1.0, 3.0), (2.0, 3.0)],
            )],
            false,
        ),
        (
            vec![Series::new("zero", vec![(0.0, 0.0), (1.0, 0.0)])],
            false,
        ),
        (
            vec![Series::new("same x", vec![(1.0, 0.0), (1.0, 5.0)])],
            false,
        ),
        (
            vec![Series::new(
                "neg",
                vec![(0.0, -1.0), (1.0, 0.0), (2.0, 1e-3)],
            )],
            true,
        ),
        (
            vec![Series::new("all neg", vec![(0.0, -1.0), (1.0, 0.0)])],
            true,
        ),
        (
            vec![Series::new(
                "inf",
                vec![(0.0, inf), (1.0, -inf), (inf, 1.0), (2.0, 2.0)],
            )],
            false,
        ),
        (
            vec![Series::new("huge", vec![(-1e300, -1e300), (1e300, 1e300)])],
            false,
        ),
        (
            vec![Series::new("huge log", vec![(0.0, 1e-300), (1.0, 1e300)])],
            true,
        ),
        (
            vec![Series::new("tiny", vec![(0.0, 1e-320), (1.0, 1e-320)])],
            true,
        ),
        (
            vec![Series::new("close", vec![(0.0, 1.0), (1.0, 1.0 + 1e-15)])],
            false,
        ),
        (
            vec![Series::new(
                "unsorted",
                vec![(3.0, 1.0), (1.0, 2.0), (2.0, 0.5)],
            )],
            false,
        ),
        (
            vec![Series::new(long_name.clone(), vec![(0.0, 1.0), (1.0, 2.0)])],
            false,
        ),
        (
            vec![Series::new("non-ASCII: ×é∞", vec![(0.0, 1.0), (1.0, 2.0)])],
            false,
        ),
        (
            (0..25)
                .map(|k| Series::new(format!("s{k}"), vec![(0.0, f64::from(k)), (1.0, 1.0)]))
                .collect(),
            false,
        ),
    ];
    for (series, log_y) in cases {
        let c = Chart {
            title: long_name.clone(),
            x_label: "step".into(),
            y_label: "value".into(),
            series,
            log_y,
        };
        for (w, h) in [(900, 540), (160, 120)] {
            let img = render(&c, w, h).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            assert_eq!(img.dimensions(), (w, h));
        }
    }
}

#[test]
fn too_small_or_too_large_is_an_error() {
    let c = chart(vec![Series::new("x", vec![(0.0, 1.0), (1.0, 2.0)])], false);
    assert!(render(&c, 0, 0).is_err());
    assert!(render(&c, 40, 30).is_err());
    assert!(render(&c, 100_000, 100).is_err());
}

/// A fresh, empty folder for one test's files.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("beitv2-plot-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn training_charts() -> Vec<Chart> {
    let steps = 0..200;
    let loss = steps
        .clone()
        .map(|s| (f64::from(s), 3.0 * (-f64::from(s) / 60.0).exp() + 0.2))
        .collect();
    let lr = steps
        .map(|s| (f64::from(s), 1e-3 * (f64::from(s) / 20.0).min(1.0)))
        .collect();
    vec![
        Chart {
            title: "Loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![Series::new("train", loss)],
            log_y: true,
        },
        Chart {
            title: "Learning rate".into(),
            x_label: "step".into(),
            y_label: "lr".into(),
            series: vec![Series::new("lr", lr)],
            log_y: false,
        },
    ]
}

#[test]
fn save_png_writes_a_decodable_png_atomically() {
    let dir = scratch_dir("single");
    let path = dir.join("loss.png");
    save_png(&training_charts()[0], &path).unwrap();
    let img = image::open(&path).unwrap();
    assert_eq!((img.width(), img.height()), (DEFAULT_WIDTH, DEFAULT_HEIGHT));
    // Only the target remains: the temporary file was renamed over it.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["loss.png"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_panels_stacks_charts_vertically() {
    let dir = scratch_dir("panels");
    let path = dir.join("curves.png");
    let charts = training_charts();
    save_panels(&charts, &path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (DEFAULT_WIDTH, 2 * DEFAULT_HEIGHT));
    // Each panel is the chart rendered on its own.
    let second = render(&charts[1], DEFAULT_WIDTH, DEFAULT_HEIGHT).unwrap();
    let crop = image::imageops::crop_imm(&img, 0, DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_HEIGHT);
    assert!(crop.to_image() == second);
    assert!(save_panels(&[], &dir.join("none.png")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
