//! `cache-report --plot`: the quality–cost frontier as a PNG. plotters draws the panels, grid
//! and markers into an RGB buffer; the text (titles, tick labels, legend, point labels) is
//! rasterised with ab_glyph from the DejaVu Sans file committed under assets/fonts (its
//! licence beside it), so the picture needs no system font; the buffer is written with
//! icdit's PNG writer.

use std::path::Path;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use icdit::{CachePolicy, Error};
use plotters::prelude::*;

use crate::report::Row;

/// DejaVu Sans (Bitstream Vera licence with public-domain DejaVu changes: assets/fonts).
const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
const WIDTH: u32 = 1500;
const HEIGHT: u32 = 640;

/// A string to draw after the chart: top-left corner x, baseline y, pixel size, colour.
struct Label {
    x: f32,
    y: f32,
    size: f32,
    text: String,
    color: RGBColor,
    /// Horizontal anchor: 0 left, 0.5 centred, 1 right.
    anchor: f32,
}

fn style(p: CachePolicy) -> (RGBColor, usize) {
    match p {
        CachePolicy::None => (RGBColor(0, 0, 0), 0),
        CachePolicy::Reuse => (RGBColor(214, 39, 40), 1),
        CachePolicy::Icc => (RGBColor(31, 119, 180), 2),
        CachePolicy::Fora => (RGBColor(255, 127, 14), 3),
        CachePolicy::Taylor => (RGBColor(44, 160, 44), 4),
    }
}

/// A setting's short label on the plot: "p3", "svd r16 p3", "o2 p3".
fn short(setting: &str) -> String {
    setting.replace("period ", "p").replace("order ", "o").split(" warm-up").next().unwrap_or_default().to_string()
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::invalid("--plot", format!("drawing the frontier failed: {e}"))
}

/// Two panels side by side: PSNR against the time ratio (left) and the MAC ratio (right).
pub fn frontier(path: &Path, rows: &[Row], title: &str) -> Result<(), Error> {
    let points: Vec<&Row> = rows.iter().filter(|r| r.psnr.is_finite() && r.policy != CachePolicy::None).collect();
    if points.is_empty() {
        return Err(Error::invalid("--plot", "no cached setting to plot (add policies other than none)"));
    }
    let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), r| (l.min(r.psnr), h.max(r.psnr)));
    let step = nice_step((hi - lo).max(1.0) / 6.0);
    let (y0, y1) = ((lo / step).floor() * step - step * 0.5, (hi / step).ceil() * step + step * 0.5);
    let x1 = points.iter().map(|r| r.time_ratio.max(r.mac_ratio)).fold(1.0f64, f64::max) * 1.05;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    let mut labels = Vec::new();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let panels = root.split_evenly((1, 2));
        type Axis = (&'static str, fn(&Row) -> f64);
        let axes: [Axis; 2] =
            [("wall-clock time / full compute", |r| r.time_ratio), ("MACs / full compute", |r| r.mac_ratio)];
        for (panel, (area, (xname, x_of))) in panels.iter().zip(axes).enumerate() {
            let mut chart = ChartBuilder::on(area)
                .margin_top(70)
                .margin_bottom(20)
                .margin_left(20)
                .margin_right(25)
                .x_label_area_size(45)
                .y_label_area_size(55)
                .build_cartesian_2d(0.0..x1, y0..y1)
                .map_err(plot_err)?;
            chart.configure_mesh().disable_mesh().x_labels(0).y_labels(0).draw().map_err(plot_err)?;
            let grey = RGBColor(225, 225, 225);
            let mut x = 0.0;
            while x <= x1 + 1e-9 {
                chart.draw_series(LineSeries::new([(x, y0), (x, y1)], grey)).map_err(plot_err)?;
                let (px, py) = chart.backend_coord(&(x, y0));
                labels.push(Label {
                    x: px as f32,
                    y: py as f32 + 20.0,
                    size: 15.0,
                    text: format!("{x:.1}"),
                    color: BLACK,
                    anchor: 0.5,
                });
                x += 0.1;
            }
            let mut y = (y0 / step).ceil() * step;
            while y <= y1 {
                chart.draw_series(LineSeries::new([(0.0, y), (x1, y)], grey)).map_err(plot_err)?;
                let (px, py) = chart.backend_coord(&(0.0, y));
                labels.push(Label {
                    x: px as f32 - 8.0,
                    y: py as f32 + 5.0,
                    size: 15.0,
                    text: format!("{y:.0}"),
                    color: BLACK,
                    anchor: 1.0,
                });
                y += step;
            }
            // The time budgets of the summary table, on the time panel.
            for budget in [0.35, 0.5].into_iter().filter(|_| panel == 0) {
                let dash = RGBColor(150, 150, 150);
                chart
                    .draw_series(DashedLineSeries::new([(budget, y0), (budget, y1)], 6, 4, dash.into()))
                    .map_err(plot_err)?;
            }
            for r in &points {
                let (color, shape) = style(r.policy);
                let at = (x_of(r), r.psnr);
                let f = color.filled();
                match shape {
                    1 => chart.draw_series([TriangleMarker::new(at, 7, f)]).map(|_| ()),
                    2 => chart.draw_series([Circle::new(at, 5, f)]).map(|_| ()),
                    3 => chart.draw_series([Cross::new(at, 6, color.stroke_width(3))]).map(|_| ()),
                    _ => chart.draw_series([EmptyElement::at(at) + Rectangle::new([(-5, -5), (5, 5)], f)]).map(|_| ()),
                }
                .map_err(plot_err)?;
                let (px, py) = chart.backend_coord(&at);
                labels.push(Label {
                    x: px as f32 + 7.0,
                    y: py as f32 - 6.0,
                    size: 12.0,
                    text: short(&r.setting),
                    color,
                    anchor: 0.0,
                });
            }
            let (left, bottom) = chart.backend_coord(&(0.0, y0));
            let (right, top) = chart.backend_coord(&(x1, y1));
            labels.push(Label {
                x: (left + right) as f32 / 2.0,
                y: bottom as f32 + 42.0,
                size: 17.0,
                text: xname.into(),
                color: BLACK,
                anchor: 0.5,
            });
            labels.push(Label {
                x: left as f32,
                y: top as f32 - 12.0,
                size: 17.0,
                text: "PSNR vs full compute (dB)".into(),
                color: BLACK,
                anchor: 0.0,
            });
            // Legend: one entry per policy present, in a row above the panel's top right.
            let mut seen: Vec<CachePolicy> = Vec::new();
            for r in &points {
                if !seen.contains(&r.policy) {
                    seen.push(r.policy);
                }
            }
            for (k, &p) in seen.iter().rev().enumerate() {
                let (color, shape) = style(p);
                let (lx, ly) = (right - 70 - 85 * k as i32, top - 17);
                let (at, f) = ((lx, ly), color.filled());
                match shape {
                    1 => root.draw(&TriangleMarker::new(at, 7, f)),
                    2 => root.draw(&Circle::new(at, 5, f)),
                    3 => root.draw(&Cross::new(at, 6, color.stroke_width(3))),
                    _ => root.draw(&(EmptyElement::at(at) + Rectangle::new([(-5, -5), (5, 5)], f))),
                }
                .map_err(plot_err)?;
                labels.push(Label {
                    x: lx as f32 + 12.0,
                    y: ly as f32 + 5.0,
                    size: 15.0,
                    text: p.name().into(),
                    color: BLACK,
                    anchor: 0.0,
                });
            }
        }
        root.present().map_err(plot_err)?;
    }
    labels.push(Label { x: WIDTH as f32 / 2.0, y: 30.0, size: 19.0, text: title.into(), color: BLACK, anchor: 0.5 });
    let font = FontRef::try_from_slice(FONT).map_err(plot_err)?;
    for l in &labels {
        draw_text(&mut buf, &font, l);
    }
    icdit::image::write_png(path, &buf, WIDTH as usize, HEIGHT as usize, 3)
}

/// A tick step of 1, 2 or 5 times a power of ten near `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|&s| s >= raw).unwrap_or(10.0 * p)
}

/// Rasterises one label into the RGB buffer, blending by glyph coverage.
fn draw_text(buf: &mut [u8], font: &FontRef, l: &Label) {
    let scaled = font.as_scaled(PxScale::from(l.size));
    let width: f32 = l.text.chars().map(|c| scaled.h_advance(font.glyph_id(c))).sum();
    let mut caret = l.x - l.anchor * width;
    for c in l.text.chars() {
        let id = font.glyph_id(c);
        let glyph = id.with_scale_and_position(l.size, point(caret, l.y));
        caret += scaled.h_advance(id);
        let Some(outline) = font.outline_glyph(glyph) else { continue };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, cov| {
            let (x, y) = (b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32);
            if x < 0 || y < 0 || x >= WIDTH as i32 || y >= HEIGHT as i32 {
                return;
            }
            let i = (y as usize * WIDTH as usize + x as usize) * 3;
            let cov = cov.clamp(0.0, 1.0);
            for (k, ch) in [l.color.0, l.color.1, l.color.2].into_iter().enumerate() {
                buf[i + k] = (buf[i + k] as f32 * (1.0 - cov) + ch as f32 * cov).round() as u8;
            }
        });
    }
}
