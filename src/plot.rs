//! PNG line charts (loss curves, sweeps) drawn with [plotters], behind the `plot` cargo feature.
//!
//! Text is rendered with a bundled copy of DejaVu Sans (`assets/DejaVuSans.ttf`, license in
//! `assets/DejaVuSans-LICENSE.txt`), so neither building nor running needs system fonts,
//! fontconfig or freetype.
//!
//! ```no_run
//! use candle_peft::plot::{LineChart, Scale, Series};
//! # fn main() -> candle_peft::Result<()> {
//! let loss = Series { name: "train".into(), points: vec![(1.0, 2.3), (2.0, 1.7), (3.0, 1.2)] };
//! let chart =
//!     LineChart { title: "Loss", x_label: "step", y_label: "loss", x_scale: Scale::Linear, y_scale: Scale::Log };
//! chart.write_png("loss.png".as_ref(), &[loss])?;
//! # Ok(()) }
//! ```
//!
//! The file is written to a temporary name in the same directory and renamed into place, so an
//! interrupted write never leaves a half-written PNG where a good one was.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use plotters::backend::RGBPixel;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::{Error, Result};

/// Width of the PNG, in pixels.
pub const WIDTH: u32 = 800;
/// Height of the PNG, in pixels.
pub const HEIGHT: u32 = 500;
/// Series with at most this many plottable points get a marker on every point.
pub const MARKER_MAX_POINTS: usize = 30;

/// The bundled font (DejaVu Sans), registered with plotters as `sans-serif`.
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FONT: &str = "sans-serif";

/// Line colours: matplotlib's "tab10" (readable on white); later series get golden-angle hues.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a chart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// The name shown in the legend (an empty name gets no legend entry).
    pub name: String,
    /// The `(x, y)` points, joined in the order given. Points with a NaN or infinite
    /// coordinate, and on a log axis points whose coordinate is not positive, are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Axis scale.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scale {
    /// Evenly spaced values.
    #[default]
    Linear,
    /// Base-10 logarithmic; values `<= 0` cannot be shown and are skipped.
    Log,
}

/// A line chart: title, axis labels, scales. Write it with [`LineChart::write_png`].
#[derive(Debug, Clone, Copy)]
pub struct LineChart<'a> {
    /// Caption above the chart; empty for none.
    pub title: &'a str,
    /// Label under the x axis; empty for none.
    pub x_label: &'a str,
    /// Label left of the y axis; empty for none.
    pub y_label: &'a str,
    /// Scale of the x axis.
    pub x_scale: Scale,
    /// Scale of the y axis.
    pub y_scale: Scale,
}

/// A series reduced to the points that can be drawn.
struct Prepared<'s> {
    /// Position in the caller's slice (picks the colour, so colours do not shift when a series
    /// has nothing to draw).
    index: usize,
    name: &'s str,
    points: Vec<(f64, f64)>,
}

/// One axis as drawn: the value range, its scale, and how tick labels are written.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    scale: Scale,
    /// Write tick labels as `2e-4` rather than `0.0002`.
    scientific: bool,
}

impl LineChart<'_> {
    /// Draws `series` as a [`WIDTH`]x[`HEIGHT`] PNG (white background, grid, one colour per
    /// series, a legend, markers on series of at most [`MARKER_MAX_POINTS`] points) and writes
    /// it to `path` atomically, whatever the file's extension.
    ///
    /// Axis ranges cover the plottable points with a small margin. It is an [`Error::Plot`]
    /// when no series has a single plottable point (see [`Series::points`]), and an
    /// [`Error::Io`] when the file cannot be written.
    pub fn write_png(&self, path: &Path, series: &[Series]) -> Result<()> {
        let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
        self.render(series, &mut rgb)?;

        let tmp = temp_path(path)?;
        // Creating the file ourselves turns the common failures (no such directory, no
        // permission) into an `Error::Io` naming the path.
        std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        let result = encode_png(&tmp, path, &rgb).and_then(|()| {
            let finish = || -> std::io::Result<()> {
                std::fs::OpenOptions::new().write(true).open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, path)
            };
            finish().map_err(|e| Error::io(path, e))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Draws the chart into `rgb`, an RGB buffer of [`WIDTH`]x[`HEIGHT`] pixels.
    fn render(&self, series: &[Series], rgb: &mut [u8]) -> Result<()> {
        ensure_font()?;
        let prepared = self.prepare(series);
        let all = || prepared.iter().flat_map(|s| s.points.iter());
        let x = Axis::fit(all().map(|p| p.0), self.x_scale, "x")?;
        let y = Axis::fit(all().map(|p| p.1), self.y_scale, "y")?;
        let (xr, yr) = (x.lo..x.hi, y.lo..y.hi);
        match (x.scale, y.scale) {
            (Scale::Linear, Scale::Linear) => self.draw(rgb, xr, yr, x, y, &prepared),
            (Scale::Linear, Scale::Log) => self.draw(rgb, xr, yr.log_scale(), x, y, &prepared),
            (Scale::Log, Scale::Linear) => self.draw(rgb, xr.log_scale(), yr, x, y, &prepared),
            (Scale::Log, Scale::Log) => self.draw(rgb, xr.log_scale(), yr.log_scale(), x, y, &prepared),
        }
    }

    /// Keeps the points each axis can show; drops series left with none.
    fn prepare<'s>(&self, series: &'s [Series]) -> Vec<Prepared<'s>> {
        let ok = |v: f64, scale: Scale| v.is_finite() && (scale == Scale::Linear || v > 0.0);
        series
            .iter()
            .enumerate()
            .map(|(index, s)| Prepared {
                index,
                name: &s.name,
                points: s.points.iter().copied().filter(|&(x, y)| ok(x, self.x_scale) && ok(y, self.y_scale)).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    }

    fn draw<X, Y>(&self, rgb: &mut [u8], xr: X, yr: Y, x: Axis, y: Axis, series: &[Prepared<'_>]) -> Result<()>
    where
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(rgb, (WIDTH, HEIGHT)).map_err(plot_err)?;
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;

        let mut builder = ChartBuilder::on(&root);
        builder.margin(15).x_label_area_size(45).y_label_area_size(75);
        if !self.title.is_empty() {
            builder.caption(self.title, (FONT, 22));
        }
        let mut chart = builder.build_cartesian_2d(xr, yr).map_err(plot_err)?;

        let x_fmt = |v: &f64| x.label(*v);
        let y_fmt = |v: &f64| y.label(*v);
        let mut mesh = chart.configure_mesh();
        mesh.x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215));
        // Log axes already get a line at every 1..9 x 10^k; finer ones only clutter.
        if x.scale == Scale::Log {
            mesh.x_max_light_lines(0);
        }
        if y.scale == Scale::Log {
            mesh.y_max_light_lines(0);
        }
        if !self.x_label.is_empty() {
            mesh.x_desc(self.x_label);
        }
        if !self.y_label.is_empty() {
            mesh.y_desc(self.y_label);
        }
        mesh.draw().map_err(plot_err)?;

        for s in series {
            let color = series_color(s.index);
            let line = chart
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?;
            if !s.name.is_empty() {
                line.label(s.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            if s.points.len() <= MARKER_MAX_POINTS {
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(plot_err)?;
            }
        }
        if series.iter().any(|s| !s.name.is_empty()) {
            chart
                .configure_series_labels()
                .position(legend_corner(series, x, y))
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)
    }
}

fn plot_err(e: impl Display) -> Error {
    Error::Plot(e.to_string())
}

/// Registers the bundled font with plotters once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(|| register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()) {
        Ok(())
    } else {
        Err(Error::Plot("the bundled font assets/DejaVuSans.ttf could not be loaded".into()))
    }
}

fn series_color(index: usize) -> RGBColor {
    match COLORS.get(index) {
        Some(&c) => c,
        None => {
            // Hues a golden angle apart, at a saturation and lightness that read well on white.
            let hue = (index as f64 * 0.618_033_988_75).fract();
            let (r, g, b) = HSLColor(hue, 0.65, 0.42).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// The corner of the plot whose legend-sized box covers the fewest drawn points and line
/// samples (upper right on a tie).
fn legend_corner(series: &[Prepared<'_>], x: Axis, y: Axis) -> SeriesLabelPosition {
    let named: Vec<&Prepared<'_>> = series.iter().filter(|s| !s.name.is_empty()).collect();
    let longest = named.iter().map(|s| s.name.chars().count()).max().unwrap_or(0);
    // The legend's size as a fraction of the plotting area (about 690 x 400 pixels).
    let w = ((45 + 8 * longest) as f64 / 690.0).min(1.0);
    let h = ((12 + 19 * named.len()) as f64 / 400.0).min(1.0);
    let corners = [
        (SeriesLabelPosition::UpperRight, 1.0 - w..=1.0, 1.0 - h..=1.0),
        (SeriesLabelPosition::UpperLeft, 0.0..=w, 1.0 - h..=1.0),
        (SeriesLabelPosition::LowerRight, 1.0 - w..=1.0, 0.0..=h),
        (SeriesLabelPosition::LowerLeft, 0.0..=w, 0.0..=h),
    ];
    let mut hits = [0usize; 4];
    let mut count = |(px, py): (f64, f64)| {
        for (hit, (_, cx, cy)) in hits.iter_mut().zip(&corners) {
            *hit += usize::from(cx.contains(&px) && cy.contains(&py));
        }
    };
    for s in series {
        let norm: Vec<(f64, f64)> = s.points.iter().map(|&(px, py)| (x.fraction(px), y.fraction(py))).collect();
        if let Some(&first) = norm.first() {
            count(first);
        }
        for pair in norm.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            for k in 1..=8 {
                let t = f64::from(k) / 8.0;
                count((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t));
            }
        }
    }
    let best = (0..4).min_by_key(|&i| hits[i]).unwrap_or(0);
    corners[best].0.clone()
}

impl Axis {
    /// The axis for `values` (already filtered for `scale`): their range plus a small margin.
    fn fit(values: impl Iterator<Item = f64>, scale: Scale, name: &str) -> Result<Axis> {
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if lo > hi {
            let what = match scale {
                Scale::Linear => "finite",
                Scale::Log => "finite, positive (log scale)",
            };
            return Err(Error::Plot(format!("no {what} points to plot on the {name} axis: the chart would be empty")));
        }
        let (lo, hi) = match scale {
            Scale::Linear => {
                let span = hi - lo;
                if !span.is_finite() {
                    return Err(Error::Plot(format!(
                        "the {name} values span {lo:e}..{hi:e}, too wide to plot; use a log scale or rescale them"
                    )));
                }
                let magnitude = lo.abs().max(hi.abs());
                let (a, b) = if span > magnitude * 1e-12 {
                    (lo - span * 0.05, hi + span * 0.05)
                } else {
                    // One value (or values equal up to rounding): a window around it.
                    let pad = if magnitude > 0.0 { (magnitude * 0.1).max(1e-300) } else { 1.0 };
                    (lo - pad, hi + pad)
                };
                (a.max(-f64::MAX), b.min(f64::MAX))
            }
            Scale::Log => {
                let (l, h) = (lo.log10(), hi.log10());
                let pad = if h - l > 1e-12 { (h - l) * 0.05 } else { 0.3 };
                let (mut a, b) = (l - pad, h + pad);
                // Without a power of ten inside the range plotters draws no tick at all.
                if b.floor() < a.ceil() {
                    a = a.floor();
                }
                (10f64.powf(a).max(f64::from_bits(1)), 10f64.powf(b).min(f64::MAX))
            }
        };
        let scientific = match scale {
            Scale::Linear => !(1e-3..1e5).contains(&lo.abs().max(hi.abs())),
            Scale::Log => lo < 1e-3 || hi >= 1e5,
        };
        Ok(Axis { lo, hi, scale, scientific })
    }

    /// Where `v` falls along the axis, 0 at the low end and 1 at the high end.
    fn fraction(&self, v: f64) -> f64 {
        match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log => (v.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln()),
        }
    }

    /// The label of the tick at `v`.
    fn label(&self, v: f64) -> String {
        let step = match self.scale {
            // Ticks are at most about a twentieth of the axis apart.
            Scale::Linear => (self.hi - self.lo) / 20.0,
            // 1..9 x 10^k: two significant digits are plenty.
            Scale::Log => v.abs() / 100.0,
        };
        format_tick(v, step, self.scientific)
    }
}

/// Formats a tick value `v` given the spacing `step` between ticks: enough digits to tell
/// ticks apart, trailing zeros trimmed, as `1.5e-4` when `scientific`.
fn format_tick(v: f64, step: f64, scientific: bool) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let step = step.abs();
    let a = v.abs();
    if a == 0.0 || (step > 0.0 && a < step * 1e-6) {
        return "0".into();
    }
    let digits_below = |x: f64| if x > 0.0 && x.is_finite() { -x.log10().floor() } else { 0.0 };
    if scientific {
        let digits = if step > 0.0 { (a.log10().floor() + digits_below(step)).clamp(0.0, 6.0) } else { 3.0 } as usize;
        let s = format!("{v:.digits$e}");
        match s.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
            None => s,
        }
    } else {
        let decimals = digits_below(step).clamp(0.0, 12.0) as usize;
        trim_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// A temporary name next to `path`, ending in `.png` (the encoder picks the format from it).
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path")))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(".{}.tmp-{}-{n}.png", name.to_string_lossy(), std::process::id())))
}

/// Encodes an RGB buffer of [`WIDTH`]x[`HEIGHT`] pixels as a PNG at `tmp`, the temporary file
/// of `path` (which an error names).
fn encode_png(tmp: &Path, path: &Path, rgb: &[u8]) -> Result<()> {
    let mut backend = BitMapBackend::new(tmp, (WIDTH, HEIGHT));
    backend.blit_bitmap((0, 0), (WIDTH, HEIGHT), rgb).map_err(plot_err)?;
    backend.present().map_err(|e| Error::Plot(format!("cannot write {}: {e}", path.display())))
}

/// The trailing mean of `ys` over up to `window` values (fewer at the start), for smoothing
/// noisy per-step curves.
pub fn moving_average(ys: &[f64], window: usize) -> Vec<f64> {
    (0..ys.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window.max(1));
            ys[from..=i].iter().sum::<f64>() / (i + 1 - from) as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// Walks the PNG's chunks (checking every CRC) and returns (width, height, bit depth,
    /// colour type) from IHDR.
    fn check_png(bytes: &[u8]) -> (u32, u32, u8, u8) {
        assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG");
        let mut pos = 8;
        let mut chunks = Vec::new();
        let mut ihdr = None;
        while pos < bytes.len() {
            let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &bytes[pos + 4..pos + 8];
            let data = &bytes[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(bytes[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            assert_eq!(
                crc,
                crc32(&bytes[pos + 4..pos + 8 + len]),
                "bad CRC in chunk {}",
                String::from_utf8_lossy(kind)
            );
            if kind == b"IHDR" {
                let be = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                ihdr = Some((be(0), be(4), data[8], data[9]));
            }
            chunks.push(kind.to_vec());
            pos += 12 + len;
        }
        assert_eq!(pos, bytes.len());
        assert_eq!(chunks.first().map(Vec::as_slice), Some(&b"IHDR"[..]));
        assert_eq!(chunks.last().map(Vec::as_slice), Some(&b"IEND"[..]));
        assert!(chunks.iter().any(|c| c == b"IDAT"));
        ihdr.unwrap()
    }

    fn chart(title: &str, y_scale: Scale) -> LineChart<'_> {
        LineChart { title, x_label: "step", y_label: "loss", x_scale: Scale::Linear, y_scale }
    }

    fn curves() -> Vec<Series> {
        vec![
            Series {
                name: "train".into(),
                points: (0..200).map(|i| (i as f64, 3.0 * (-(i as f64) / 60.0).exp())).collect(),
            },
            Series {
                name: "eval".into(),
                points: (0..10).map(|i| (i as f64 * 20.0, 3.2 * (-(i as f64) / 3.0).exp())).collect(),
            },
        ]
    }

    fn render(chart: &LineChart<'_>, series: &[Series]) -> Result<Vec<u8>> {
        let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
        chart.render(series, &mut rgb)?;
        Ok(rgb)
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    fn has_color(rgb: &[u8], c: RGBColor) -> bool {
        rgb.chunks_exact(3).any(|p| p == [c.0, c.1, c.2])
    }

    #[test]
    fn writes_linear_and_log_charts() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let linear = dir.path().join("linear.png");
        chart("Loss", Scale::Linear).write_png(&linear, &curves())?;

        // Zero, negative and non-finite values are skipped on the log axis.
        let mut points: Vec<(f64, f64)> = (1..=100).map(|i| (i as f64, 10f64.powf(-(i as f64) / 20.0))).collect();
        points.extend([(101.0, 0.0), (102.0, -1.0), (103.0, f64::NAN), (f64::INFINITY, 1.0)]);
        let log = dir.path().join("log.png");
        chart("Loss (log)", Scale::Log).write_png(&log, &[Series { name: "lr".into(), points }])?;

        for path in [&linear, &log] {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            assert_eq!(check_png(&bytes), (800, 500, 8, 2), "{}", path.display());
            // 8-bit RGB
        }
        // No temporary file is left behind.
        assert_eq!(files_in(dir.path()), ["linear.png", "log.png"]);

        // Overwriting an existing chart works too.
        chart("Loss again", Scale::Linear).write_png(&linear, &curves())?;
        assert_eq!(files_in(dir.path()), ["linear.png", "log.png"]);
        Ok(())
    }

    #[test]
    fn draws_series_colors_and_text() -> Result<()> {
        let series = curves();
        let with_title = render(&chart("A title", Scale::Linear), &series)?;
        let without = render(&chart("", Scale::Linear), &series)?;
        assert!(has_color(&with_title, COLORS[0]) && has_color(&with_title, COLORS[1]));
        assert!(!has_color(&with_title, COLORS[2]));
        assert_ne!(with_title, without, "the title changed nothing: text is not rendered");

        // The title is dark pixels in the top middle, which is blank without it.
        let dark_in_top_band = |rgb: &[u8]| {
            let rows = rgb[..(WIDTH * 40 * 3) as usize].chunks_exact((WIDTH * 3) as usize);
            let middle = rows.flat_map(|row| row[250 * 3..550 * 3].chunks_exact(3));
            middle.filter(|p| p.iter().all(|&c| c < 128)).count()
        };
        assert!(dark_in_top_band(&with_title) > 50, "{}", dark_in_top_band(&with_title));
        assert_eq!(dark_in_top_band(&without), 0);

        // Axis labels are text too.
        let unlabeled = LineChart { x_label: "", y_label: "", ..chart("", Scale::Linear) };
        assert_ne!(render(&unlabeled, &series)?, without);
        Ok(())
    }

    #[test]
    fn degenerate_data_still_draws() -> Result<()> {
        let one = [Series { name: "one".into(), points: vec![(5.0, 2.0)] }];
        let flat = [Series { name: "flat".into(), points: vec![(0.0, 0.0), (1.0, 0.0), (2.0, 0.0)] }];
        let same_x = [Series { name: "".into(), points: vec![(1.0, 1.0), (1.0, 3.0)] }];
        let tiny = [Series { name: "tiny".into(), points: vec![(f64::from_bits(1), f64::MIN_POSITIVE)] }];
        let huge = [Series { name: "huge".into(), points: vec![(1.0, 1e300), (2.0, -1e300)] }];
        for (series, scale) in [
            (&one, Scale::Linear),
            (&one, Scale::Log),
            (&flat, Scale::Linear),
            (&same_x, Scale::Log),
            (&tiny, Scale::Linear),
            (&tiny, Scale::Log),
            (&huge, Scale::Linear),
        ] {
            let rgb = render(&chart("t", scale), series)?;
            assert!(has_color(&rgb, COLORS[0]), "{series:?} {scale:?}");
        }
        let all_log = LineChart { x_scale: Scale::Log, ..chart("t", Scale::Log) };
        render(&all_log, &[Series { name: "a".into(), points: vec![(3.0, 2.0), (4.0, 5.0)] }])?;
        render(&all_log, &one)?;

        // Many series: colours beyond the first ten are generated.
        let many: Vec<Series> = (0..15)
            .map(|i| Series { name: format!("s{i}"), points: vec![(0.0, i as f64), (1.0, i as f64 + 1.0)] })
            .collect();
        let rgb = render(&chart("many", Scale::Linear), &many)?;
        assert!(has_color(&rgb, series_color(12)));
        Ok(())
    }

    #[test]
    fn empty_or_unplottable_input_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("empty.png");
        let nan = Series {
            name: "nan".into(),
            points: vec![(f64::NAN, 1.0), (1.0, f64::INFINITY), (f64::NEG_INFINITY, 0.0)],
        };
        let non_positive = Series { name: "neg".into(), points: vec![(1.0, 0.0), (2.0, -3.0)] };
        let cases: [(LineChart<'_>, Vec<Series>); 5] = [
            (chart("t", Scale::Linear), vec![]),
            (chart("t", Scale::Linear), vec![Series::default()]),
            (chart("t", Scale::Linear), vec![nan.clone()]),
            (chart("t", Scale::Log), vec![non_positive, nan]),
            (
                chart("t", Scale::Linear),
                vec![Series { name: "wide".into(), points: vec![(0.0, f64::MAX), (1.0, -f64::MAX)] }],
            ),
        ];
        for (c, series) in &cases {
            match c.write_png(&path, series) {
                Err(Error::Plot(msg)) => assert!(msg.contains("empty") || msg.contains("too wide"), "{msg}"),
                other => panic!("{series:?}: expected Error::Plot, got {other:?}"),
            }
        }
        assert!(files_in(dir.path()).is_empty(), "{:?}", files_in(dir.path()));

        // A directory that does not exist is an I/O error naming the path.
        let missing = dir.path().join("no/such/dir/chart.png");
        match chart("t", Scale::Linear).write_png(&missing, &curves()) {
            Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("chart.png"), "{e}"),
            other => panic!("expected Error::Io, got {other:?}"),
        }
        assert!(matches!(chart("t", Scale::Linear).write_png(Path::new("/"), &curves()), Err(Error::Io { .. })));
        Ok(())
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_tick(0.5, 0.05, false), "0.5");
        assert_eq!(format_tick(1.0, 0.05, false), "1");
        assert_eq!(format_tick(1.25, 0.0125, false), "1.25");
        assert_eq!(format_tick(150.0, 10.0, false), "150");
        assert_eq!(format_tick(1e-17, 0.1, false), "0");
        assert_eq!(format_tick(-0.25, 0.025, false), "-0.25");
        assert_eq!(format_tick(0.02, 0.0002, false), "0.02");
        assert_eq!(format_tick(2e-4, 2e-6, true), "2e-4");
        assert_eq!(format_tick(1.5e-4, 1.5e-6, true), "1.5e-4");
        assert_eq!(format_tick(0.001, 1e-5, true), "1e-3");
        assert_eq!(format_tick(200_000.0, 10_000.0, true), "2e5");
        assert_eq!(format_tick(f64::NAN, 1.0, false), "");

        // One notation per axis: a log axis reaching below 1e-3 is scientific throughout.
        let lr = Axis::fit([1e-5, 3e-3].into_iter(), Scale::Log, "x").unwrap();
        assert_eq!([lr.label(1e-5), lr.label(1e-4), lr.label(1e-3)], ["1e-5", "1e-4", "1e-3"]);
        let loss = Axis::fit([0.1, 3.0].into_iter(), Scale::Log, "y").unwrap();
        assert_eq!([loss.label(0.1), loss.label(0.2), loss.label(1.0), loss.label(3.0)], ["0.1", "0.2", "1", "3"]);
        let steps = Axis::fit([0.0, 200.0].into_iter(), Scale::Linear, "x").unwrap();
        assert_eq!([steps.label(0.0), steps.label(20.0), steps.label(200.0)], ["0", "20", "200"]);
    }

    #[test]
    fn axis_ranges() -> Result<()> {
        let x = Axis::fit([0.0, 10.0].into_iter(), Scale::Linear, "x")?;
        assert!(x.lo < 0.0 && x.hi > 10.0 && x.lo > -1.0 && x.hi < 11.0, "{x:?}");
        let x = Axis::fit([3.0].into_iter(), Scale::Linear, "x")?;
        assert!(x.lo < 3.0 && x.hi > 3.0, "{x:?}");
        let x = Axis::fit([0.0, 0.0].into_iter(), Scale::Linear, "x")?;
        assert!(x.lo < 0.0 && x.hi > 0.0, "{x:?}");
        let y = Axis::fit([2.0, 5.0].into_iter(), Scale::Log, "y")?;
        assert!(y.lo <= 1.0 && y.hi > 5.0, "a power of ten is in range: {y:?}");
        let y = Axis::fit([7.0].into_iter(), Scale::Log, "y")?;
        assert!(y.lo < 7.0 && y.hi > 7.0, "{y:?}");
        assert!(Axis::fit(std::iter::empty(), Scale::Log, "y").is_err());
        Ok(())
    }

    #[test]
    fn legend_avoids_the_data() {
        let x = Axis { lo: 0.0, hi: 1.0, scale: Scale::Linear, scientific: false };
        let rising = [Prepared { index: 0, name: "up", points: vec![(0.0, 0.0), (1.0, 1.0)] }];
        assert!(matches!(legend_corner(&rising, x, x), SeriesLabelPosition::UpperLeft));
        let falling = [Prepared { index: 0, name: "down", points: vec![(0.0, 1.0), (1.0, 0.0)] }];
        assert!(matches!(legend_corner(&falling, x, x), SeriesLabelPosition::UpperRight));
    }
}
