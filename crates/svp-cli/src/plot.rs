//! A small SVG line chart (log2 x axis), so a person can look at a sweep
//! without a plotting dependency.

use std::fmt::Write;

/// One line of the chart.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// CSS colour.
    pub color: String,
    /// Dashed instead of solid.
    pub dashed: bool,
    /// (x, y) points, x > 0.
    pub points: Vec<(f64, f64)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A "nice" step for about `target` ticks over `0..max`.
fn tick_step(max: f64, target: f64) -> f64 {
    let raw = (max / target).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag)
}

/// The chart as an SVG document.
pub fn line_chart_svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 460.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 120.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (lx0, lx1) = (x_min.max(1e-9).log2(), x_max.max(x_min * 2.0).log2());
    let y_top = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max) * 1.05;
    let y_step = tick_step(y_top.max(1.0), 6.0);
    let y_max = (y_top / y_step).ceil().max(1.0) * y_step;
    let px = |x: f64| left + (x.log2() - lx0) / (lx1 - lx0).max(1e-9) * pw;
    let py = |y: f64| top + ph - y / y_max * ph;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ =
        writeln!(svg, r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#, w / 2.0, escape(title));
    // Y grid and ticks.
    let mut y = 0.0;
    while y <= y_max + 1e-9 {
        let yy = py(y);
        let _ = writeln!(svg, r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e0e0e0"/>"##, left + pw);
        let _ = writeln!(svg, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, yy + 4.0, y);
        y += y_step;
    }
    // X ticks at powers of two.
    let mut x = 2f64.powf(lx0.ceil());
    while x <= x_max * 1.0001 {
        let xx = px(x);
        let _ = writeln!(svg, r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{}" stroke="#e0e0e0"/>"##, top + ph);
        let _ = writeln!(svg, r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{x}</text>"#, top + ph + 16.0);
        x *= 2.0;
    }
    let _ = writeln!(svg, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        top + ph + 36.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        escape(y_label)
    );
    // Lines, points, legend.
    for (i, s) in series.iter().enumerate() {
        let dash = if s.dashed { r#" stroke-dasharray="6 4""# } else { "" };
        let pts: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            pts.join(" "),
            s.color
        );
        for &(x, y) in &s.points {
            let _ = writeln!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#, px(x), py(y), s.color);
        }
        let ly = top + ph + 58.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{left}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/>"#,
            left + 30.0,
            s.color
        );
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, left + 38.0, ly + 4.0, escape(&s.label));
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_every_series_and_point() {
        let s = vec![
            Series { label: "a<b".into(), color: "red".into(), dashed: false, points: vec![(1.0, 10.0), (64.0, 12.0)] },
            Series { label: "c".into(), color: "blue".into(), dashed: true, points: vec![(1.0, 5.0), (4.0, 80.0)] },
        ];
        let svg = line_chart_svg("t", "x", "y", &s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("a&lt;b"));
        assert!(svg.contains(">64<"), "x ticks reach 64");
        assert_eq!(tick_step(84.0, 6.0), 20.0);
    }
}
