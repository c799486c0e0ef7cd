//! Charts drawn on the server as SVG: no script, no library, and the CSP allows them (no
//! inline style: colours come from the stylesheet through classes). Every text in a chart
//! is escaped here, since the SVG is inserted into the page as markup.

use std::fmt::Write;

/// Escapes text for SVG markup.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const WIDTH: f64 = 600.0;

/// A column per value (e.g. per minute), with the first and last labels under the axis.
pub fn columns(title: &str, values: &[(String, i64)]) -> String {
    let height = 120.0;
    let max = values.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1) as f64;
    let width = WIDTH / values.len().max(1) as f64;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {}\" role=\"img\" aria-label=\"{}\">",
        height + 20.0,
        escape(title)
    );
    for (i, (label, value)) in values.iter().enumerate() {
        let h = (*value as f64 / max) * height;
        let _ = write!(
            svg,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{}: {value}</title></rect>",
            i as f64 * width + 1.0,
            height - h,
            (width - 2.0).max(1.0),
            h,
            escape(label)
        );
    }
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"0\" y1=\"{height}\" x2=\"{WIDTH}\" y2=\"{height}\"/>\
         <text class=\"tick\" x=\"0\" y=\"{}\">{}</text>\
         <text class=\"tick\" x=\"{WIDTH}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text class=\"tick\" x=\"4\" y=\"12\">max {}</text></svg>",
        height + 16.0,
        escape(values.first().map_or("", |(l, _)| l)),
        height + 16.0,
        escape(values.last().map_or("", |(l, _)| l)),
        max as i64
    );
    svg
}

/// A horizontal bar per row: its label, its bar (classed, e.g. by run status) and value.
pub fn bars(title: &str, rows: &[(String, &str, i64)]) -> String {
    let row = 24.0;
    let label_width = 200.0;
    let height = (rows.len().max(1) as f64) * row;
    let max = rows.iter().map(|(_, _, v)| *v).max().unwrap_or(0).max(1) as f64;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" aria-label=\"{}\">",
        escape(title)
    );
    if rows.is_empty() {
        svg.push_str("<text class=\"tick\" x=\"0\" y=\"16\">no runs</text>");
    }
    for (i, (label, class, value)) in rows.iter().enumerate() {
        let y = i as f64 * row;
        let w = (*value as f64 / max) * (WIDTH - label_width - 60.0);
        let _ = write!(
            svg,
            "<text class=\"label\" x=\"0\" y=\"{:.1}\">{}</text>\
             <rect class=\"bar {}\" x=\"{label_width}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{value}</text>",
            y + 16.0,
            escape(label),
            escape(class),
            y + 4.0,
            w.max(1.0),
            row - 8.0,
            label_width + w + 6.0,
            y + 16.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let svg = bars("t", &[("<script>".into(), "dead", 3)]);
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
        assert!(!svg.contains("<script>"), "{svg}");
    }

    #[test]
    fn the_tallest_column_fills_the_chart() {
        let svg = columns("t", &[("a".into(), 0), ("b".into(), 10)]);
        assert!(svg.contains("height=\"120.0\""), "{svg}");
        assert!(svg.contains("max 10"), "{svg}");
    }
}
