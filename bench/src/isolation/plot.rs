//! PNG plots, one per part, drawn with plotters' bitmap backend. Text is
//! rendered with ab_glyph from a TrueType file on this machine (no font
//! service, nothing fetched): `MOAT_BENCH_FONT`, else DejaVu Sans.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use super::result::{RuntimeResult, COST, PROBES, STRESSORS, WORKLOAD};

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
const FONT: &str = "sans-serif";
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x44, 0x77, 0xaa),
    RGBColor(0xee, 0x66, 0x77),
    RGBColor(0x22, 0x88, 0x33),
    RGBColor(0xcc, 0xbb, 0x44),
    RGBColor(0x66, 0xcc, 0xee),
    RGBColor(0xaa, 0x33, 0x77),
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// Registers the font once; an error names the files looked at.
fn font() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT.get_or_init(|| {
        let env = std::env::var("MOAT_BENCH_FONT").ok();
        let candidates: Vec<&str> = env.iter().map(String::as_str).chain(FONTS.iter().copied()).collect();
        candidates
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| format!("no TrueType font: set MOAT_BENCH_FONT or install fonts-dejavu-core (looked at {})", candidates.join(", ")))
            .and_then(|bytes| {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font(FONT, FontStyle::Normal, bytes).map_err(|_| "the font file is not a valid TrueType font".to_string())
            })
    })
    .clone()
}

/// One panel of bars: `series` (name, value per category; None = no bar)
/// grouped by category; `marked` categories of a series get `mark`
/// written instead of a bar (DNR).
struct Bars<'a> {
    title: &'a str,
    y_desc: &'a str,
    categories: Vec<String>,
    series: Vec<(String, Vec<Option<f64>>)>,
    marked: Vec<Vec<bool>>,
    mark: &'a str,
    /// Values are log10 of ratios: label the axis as ratios.
    log_ratio: bool,
}

fn bars(area: &Area, b: &Bars) -> Result<(), String> {
    let vals: Vec<f64> = b
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .collect();
    let hi = vals.iter().copied().fold(0.0f64, f64::max);
    let lo = vals.iter().copied().fold(0.0f64, f64::min);
    let pad = ((hi - lo) * 0.12).max(if b.log_ratio { 0.1 } else { 1.0 });
    let (y0, y1) = (lo - if lo < 0.0 { pad } else { 0.0 }, hi + pad);
    let n = b.categories.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(b.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, y0..y1)
        .map_err(err)?;
    let log = b.log_ratio;
    let fmt = move |y: &f64| {
        if !log {
            return format!("{y:.0}");
        }
        let x = 10f64.powf(*y);
        if x >= 10.0 {
            format!("{x:.0}×")
        } else if x >= 1.0 {
            format!("{x:.1}×")
        } else {
            format!("{x:.2}×")
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(b.y_desc)
        .y_label_formatter(&fmt)
        .label_style((FONT, 13))
        .draw()
        .map_err(err)?;
    let k = b.series.len().max(1) as f64;
    let w = 0.8 / k;
    for (si, (name, v)) in b.series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let rects = v.iter().enumerate().filter_map(|(ci, y)| {
            let x0 = ci as f64 + 0.1 + si as f64 * w;
            y.map(|y| Rectangle::new([(x0, 0.0f64.max(y0)), (x0 + w * 0.9, y)], color.filled()))
        });
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let marked = b.marked.get(si).cloned().unwrap_or_default();
        let marks = marked
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(ci, _)| {
                let x = ci as f64 + 0.1 + (si as f64 + 0.45) * w;
                Text::new(
                    b.mark.to_string(),
                    (x, y1 - pad * 0.3),
                    TextStyle::from((FONT, 11).into_font())
                        .color(&color)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )
            });
        chart.draw_series(marks).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    // Category names under the axis, placed in pixels.
    for (ci, c) in b.categories.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(ci as f64 + 0.5, y0));
        let style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        area.draw(&Text::new(
            c.clone(),
            (
                px - area.get_base_pixel().0,
                py - area.get_base_pixel().1 + 8,
            ),
            style,
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// One panel of [`bar_chart`]: named series of values by category (None:
/// no bar); `log_ratio` values are log10 of ratios.
pub struct BarChart<'a> {
    pub title: &'a str,
    pub y_desc: &'a str,
    pub categories: Vec<String>,
    pub series: Vec<(String, Vec<Option<f64>>)>,
    pub log_ratio: bool,
}

/// A PNG of `charts` side by side (other benchmarks' plots).
pub fn bar_chart(path: &Path, charts: &[BarChart]) -> Result<(), String> {
    font()?;
    let width = 700 * charts.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, charts.len().max(1)));
    for (c, area) in charts.iter().zip(panels.iter()) {
        bars(
            area,
            &Bars {
                title: c.title,
                y_desc: c.y_desc,
                categories: c.categories.clone(),
                series: c.series.clone(),
                marked: vec![],
                mark: "",
                log_ratio: c.log_ratio,
            },
        )?;
    }
    root.present().map_err(err)
}

/// Performance isolation: degradation per stressor, a panel per workload metric.
pub fn performance(path: &Path, rts: &[&RuntimeResult]) -> Result<(), String> {
    font()?;
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((2, 2));
    for ((key, label, _), area) in WORKLOAD.iter().zip(panels.iter()) {
        let series = rts
            .iter()
            .map(|r| {
                let v = STRESSORS
                    .iter()
                    .map(|(s, _)| {
                        r.performance.stressors.get(*s).and_then(|x| {
                            if x.dnr {
                                None
                            } else {
                                x.degradation_pct.get(*key).copied()
                            }
                        })
                    })
                    .collect();
                (r.name.clone(), v)
            })
            .collect();
        let marked = rts
            .iter()
            .map(|r| {
                STRESSORS
                    .iter()
                    .map(|(s, _)| r.performance.stressors.get(*s).is_some_and(|x| x.dnr))
                    .collect()
            })
            .collect();
        let title = format!("{label}: degradation beside a stressor");
        bars(
            area,
            &Bars {
                title: &title,
                y_desc: "% slower than alone",
                categories: STRESSORS.iter().map(|(_, l)| l.to_string()).collect(),
                series,
                marked,
                mark: "DNR",
                log_ratio: false,
            },
        )?;
    }
    root.present().map_err(err)
}

/// Cost of isolation: each figure's median against runc's, log scale.
pub fn cost(
    path: &Path,
    rts: &[&RuntimeResult],
    ratio: impl Fn(&RuntimeResult, &str) -> Option<f64>,
) -> Result<(), String> {
    font()?;
    let root = BitMapBackend::new(path, (1600, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let cats: Vec<&(&str, &str, &str, bool)> = COST.iter().collect();
    // runc is the 1× line itself.
    let series = rts
        .iter()
        .filter(|r| r.name != "runc")
        .map(|r| {
            (
                r.name.clone(),
                cats.iter()
                    .map(|(k, _, _, _)| ratio(r, k).filter(|x| *x > 0.0).map(f64::log10))
                    .collect(),
            )
        })
        .collect();
    let labels = cats
        .iter()
        .map(|(k, _, _, _)| {
            k.trim_end_matches("_ms")
                .trim_end_matches("_us")
                .trim_end_matches("_ns")
                .trim_end_matches("_mb_s")
                .to_string()
        })
        .collect();
    bars(&root, &Bars { title: "Cost of isolation: median against runc's (log scale; throughput and density: higher is better)", y_desc: "× runc", categories: labels, series, marked: vec![], mark: "", log_ratio: true })?;
    root.present().map_err(err)
}

fn cell_color(result: &str) -> RGBColor {
    match result {
        "blocked" => RGBColor(0x9c, 0xd6, 0x9c),
        "visible" => RGBColor(0xf5, 0xd7, 0x6e),
        "escaped" => RGBColor(0xe8, 0x7a, 0x7a),
        _ => RGBColor(0xdd, 0xdd, 0xdd),
    }
}

/// Security isolation: the matrix, runtime × probe, and the attack surface.
pub fn security(path: &Path, rts: &[&RuntimeResult]) -> Result<(), String> {
    font()?;
    let (label_w, col_w, row_h, top) = (380i32, 170i32, 34i32, 70i32);
    let rows = PROBES.len() as i32 + 1;
    let w = (label_w + col_w * rts.len() as i32 + 20) as u32;
    let h = (top + row_h * rows + 60) as u32;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let center = Pos::new(HPos::Center, VPos::Center);
    let title = (
        "Security isolation: what a container reaches (green blocked, yellow visible, red escaped)",
        18,
    );
    root.draw(&Text::new(title.0, (10, 20), (FONT, title.1)))
        .map_err(err)?;
    for (ci, r) in rts.iter().enumerate() {
        let x = label_w + ci as i32 * col_w + col_w / 2;
        root.draw(&Text::new(
            r.name.clone(),
            (x, top - 18),
            TextStyle::from((FONT, 16).into_font()).pos(center),
        ))
        .map_err(err)?;
    }
    for (ri, (key, label, _)) in PROBES.iter().enumerate() {
        let y = top + ri as i32 * row_h;
        root.draw(&Text::new(
            label.to_string(),
            (10, y + row_h / 2),
            TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(err)?;
        for (ci, r) in rts.iter().enumerate() {
            let x = label_w + ci as i32 * col_w;
            let res = if r.available {
                r.security.probes.get(*key).map_or("–", |c| c.result)
            } else {
                "not run"
            };
            root.draw(&Rectangle::new(
                [(x + 2, y + 2), (x + col_w - 2, y + row_h - 2)],
                cell_color(res).filled(),
            ))
            .map_err(err)?;
            root.draw(&Text::new(
                res.to_string(),
                (x + col_w / 2, y + row_h / 2),
                TextStyle::from((FONT, 14).into_font()).pos(center),
            ))
            .map_err(err)?;
        }
    }
    let y = top + PROBES.len() as i32 * row_h;
    root.draw(&Text::new(
        "host syscalls reachable",
        (10, y + row_h / 2),
        TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
    ))
    .map_err(err)?;
    for (ci, r) in rts.iter().enumerate() {
        let x = label_w + ci as i32 * col_w + col_w / 2;
        let n = r
            .security
            .attack_surface
            .count
            .map_or("–".to_string(), |n| n.to_string());
        root.draw(&Text::new(
            n,
            (x, y + row_h / 2),
            TextStyle::from((FONT, 15).into_font()).pos(center),
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)
}
