//! The run's chart: requests, failures, commands against the budget, replicas and the
//! events, second by second.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::state::Event;
use crate::util::Error;

pub fn draw(path: &Path, tl: &[Value], events: &[Event], budget: f64) -> Result<(), Error> {
    let t0 = tl.first().and_then(|r| r["t"].as_f64()).unwrap_or(0.0);
    let xs = |k: &'static str| -> Vec<(f64, f64)> {
        tl.iter()
            .filter_map(|r| Some((r["t"].as_f64()? - t0, r[k].as_f64()?)))
            .collect()
    };
    let x_max = tl
        .last()
        .and_then(|r| r["t"].as_f64())
        .map_or(1.0, |t| (t - t0).max(1.0));
    let root = SVGBackend::new(path, (1100, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((4, 1));
    let specs: [(&str, Vec<(&'static str, RGBColor)>); 4] = [
        (
            "requests per second (HAProxy) and failed",
            vec![("req_per_s", BLUE), ("failed_per_s", RED)],
        ),
        (
            "database commands per second (budget dashed)",
            vec![("db_commands", BLACK)],
        ),
        (
            "replicas and p95 of /api/data (ms / 100)",
            vec![("replicas", GREEN), ("p95_ms", MAGENTA)],
        ),
        (
            "write queue depth (all replicas)",
            vec![("queue_depth", CYAN)],
        ),
    ];
    for (area, (title, series)) in panels.iter().zip(specs) {
        type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
        let data: Vec<Series> = series
            .iter()
            .map(|(k, c)| {
                let mut v = xs(k);
                if *k == "p95_ms" {
                    v.iter_mut().for_each(|p| p.1 /= 100.0);
                }
                (*k, *c, v)
            })
            .collect();
        let mut y_max = data
            .iter()
            .flat_map(|d| d.2.iter().map(|p| p.1))
            .fold(1.0, f64::max);
        if title.starts_with("database") {
            y_max = y_max.max(budget * 1.3);
        }
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.05)?;
        c.configure_mesh()
            .x_desc("seconds")
            .light_line_style(WHITE)
            .draw()?;
        for e in events {
            let col = if e.kind.starts_with("chaos") {
                RED.mix(0.4)
            } else {
                GREEN.mix(0.3)
            };
            c.draw_series(LineSeries::new(
                vec![(e.t - t0, 0.0), (e.t - t0, y_max)],
                col,
            ))?;
        }
        if title.starts_with("database") {
            c.draw_series(DashedLineSeries::new(
                vec![(0.0, budget), (x_max, budget)],
                6,
                4,
                BLACK.mix(0.5).into(),
            ))?;
        }
        for (k, col, v) in data {
            c.draw_series(LineSeries::new(v, col))?
                .label(k)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
