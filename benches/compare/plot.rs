//! The take-over plot: an SVG of the latency distributions.

use std::fmt::Write as _;

use crate::stats::{Samples, fmt_ns};

/// An SVG of the take-over latency distributions: one empirical CDF per series, log time axis.
pub(crate) fn plot_takeover(series: &[(String, Samples)]) -> String {
    let (w, h) = (820.0, 460.0);
    let (left, right, top, bottom) = (70.0, 40.0, 40.0, 150.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, s)| s.0.iter().copied())
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    // A little room either side of the data, in log space.
    let (llo, lhi) = ((lo * 0.8).log10(), (hi * 1.25).log10());
    let x = |ns: f64| left + (ns.max(1.0).log10() - llo) / (lhi - llo) * pw;
    let y = |p: f64| top + (1.0 - p) * ph;
    let colours = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">Take-over latency: holder SIGKILLed → waiter's command runs (ECDF)</text>"#,
        w / 2.0
    );
    // Axes and grid: one line per decade and at 2× and 5×.
    let mut decade = llo.floor();
    while decade <= lhi {
        for m in [1.0, 2.0, 5.0] {
            let ns = 10f64.powf(decade) * m;
            if ns.log10() > lhi || ns.log10() < llo {
                continue;
            }
            let xp = x(ns);
            let _ = writeln!(
                s,
                r##"<line x1="{xp:.1}" y1="{top}" x2="{xp:.1}" y2="{}" stroke="#dddddd"/>"##,
                top + ph
            );
            let _ = writeln!(
                s,
                r#"<text x="{xp:.1}" y="{}" text-anchor="middle">{}</text>"#,
                top + ph + 16.0,
                fmt_ns(ns)
            );
        }
        decade += 1.0;
    }
    for p in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let yp = y(p);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yp:.1}" x2="{}" y2="{yp:.1}" stroke="#dddddd"/>"##,
            left + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{p}</text>"#,
            left - 6.0,
            yp + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">latency (log scale)</text>"#,
        left + pw / 2.0,
        top + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">fraction of trials ≤ latency</text>"#,
        top + ph / 2.0
    );
    for (i, (label, samples)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let v = samples.sorted();
        let n = v.len() as f64;
        let mut path = String::new();
        for (k, ns) in v.iter().enumerate() {
            let (xp, y0, y1) = (x(*ns), y(k as f64 / n), y((k + 1) as f64 / n));
            let _ = write!(
                path,
                "{}{xp:.1},{y0:.1} L{xp:.1},{y1:.1} ",
                if k == 0 { "M" } else { "L" }
            );
        }
        let _ = writeln!(
            s,
            r#"<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>"#
        );
        let ly = top + ph + 56.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            left + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{label}: p50 {}, p99 {} (n={})</text>"#,
            left + 32.0,
            ly + 4.0,
            fmt_ns(samples.median()),
            fmt_ns(samples.p99()),
            samples.len()
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}
