//! Line charts as SVG and PNG, with no plotting library: the layout emits a
//! handful of primitives (lines, rectangles, text) that two small backends
//! draw. The PNG backend rasterises them itself with the public-domain 8×8
//! font of `font8x8` and encodes with `png`, so a picture needs no system
//! fonts or native libraries.

use std::fmt::Write as _;

pub type Rgb = (u8, u8, u8);

/// Colours of successive series (colour-blind-safe palette).
pub const PALETTE: [Rgb; 6] = [
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
];
const FAULT: Rgb = (200, 30, 30);
const AXIS: Rgb = (40, 40, 40);
const GRID: Rgb = (225, 225, 225);
const TEXT: Rgb = (20, 20, 20);

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: Rgb,
}

/// A vertical line at `x` (a fault injected at that moment).
#[derive(Debug, Clone)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
    /// A line of small print under the title.
    pub note: Option<String>,
    /// The x values are counts (nodes): whole-number ticks.
    pub x_integer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Anchor {
    Start,
    Middle,
    End,
}

#[derive(Debug, Clone)]
enum Prim {
    Line(LinePrim),
    Rect { x: f64, y: f64, w: f64, h: f64, color: Rgb },
    Text(TextPrim),
}

#[derive(Debug, Clone)]
struct LinePrim {
    a: (f64, f64),
    b: (f64, f64),
    color: Rgb,
    width: f64,
    dashed: bool,
}

#[derive(Debug, Clone)]
struct TextPrim {
    x: f64,
    y: f64,
    text: String,
    color: Rgb,
    size: f64,
    anchor: Anchor,
    vertical: bool,
}

const W: f64 = 1000.0;
const H: f64 = 560.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 80.0;
const BOTTOM: f64 = 70.0;

/// Round tick steps (1, 2, 5 × 10^k) covering `0..=max` in about `n` steps.
fn ticks(max: f64, n: usize) -> (f64, Vec<f64>) {
    ticks_min_step(max, n, 0.0)
}

fn ticks_min_step(max: f64, n: usize, min_step: f64) -> (f64, Vec<f64>) {
    let max = if max > 0.0 && max.is_finite() { max } else { 1.0 };
    let raw = (max / n as f64).max(min_step);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let top = (max / step).ceil() * step;
    let mut v = Vec::new();
    let mut t = 0.0;
    while t <= top + step / 2.0 {
        v.push(t);
        t += step;
    }
    (top, v)
}

fn fmt_tick(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

impl Chart {
    fn layout(&self) -> Vec<Prim> {
        let mut p = Vec::new();
        let x_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|q| q.0))
            .chain(self.markers.iter().map(|m| m.x))
            .fold(0.0f64, f64::max);
        let y_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|q| q.1))
            .fold(0.0f64, f64::max);
        let (x_top, x_ticks) = ticks_min_step(x_max, 10, if self.x_integer { 1.0 } else { 0.0 });
        let (y_top, y_ticks) = ticks(y_max * 1.05, 6);
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let px = |x: f64| LEFT + pw * x / x_top;
        let py = |y: f64| TOP + ph * (1.0 - y / y_top);

        p.push(Prim::Rect {
            x: 0.0,
            y: 0.0,
            w: W,
            h: H,
            color: (255, 255, 255),
        });
        for &t in &y_ticks {
            p.push(Prim::Line(LinePrim {
                a: (LEFT, py(t)),
                b: (W - RIGHT, py(t)),
                color: GRID,
                width: 1.0,
                dashed: false,
            }));
            p.push(Prim::Text(TextPrim {
                x: LEFT - 8.0,
                y: py(t) + 4.0,
                text: fmt_tick(t),
                color: TEXT,
                size: 12.0,
                anchor: Anchor::End,
                vertical: false,
            }));
        }
        for &t in &x_ticks {
            p.push(Prim::Line(LinePrim {
                a: (px(t), TOP + ph),
                b: (px(t), TOP + ph + 5.0),
                color: AXIS,
                width: 1.0,
                dashed: false,
            }));
            p.push(Prim::Text(TextPrim {
                x: px(t),
                y: TOP + ph + 20.0,
                text: fmt_tick(t),
                color: TEXT,
                size: 12.0,
                anchor: Anchor::Middle,
                vertical: false,
            }));
        }
        // Axes.
        p.push(Prim::Line(LinePrim {
            a: (LEFT, TOP),
            b: (LEFT, TOP + ph),
            color: AXIS,
            width: 1.5,
            dashed: false,
        }));
        p.push(Prim::Line(LinePrim {
            a: (LEFT, TOP + ph),
            b: (W - RIGHT, TOP + ph),
            color: AXIS,
            width: 1.5,
            dashed: false,
        }));
        p.push(Prim::Text(TextPrim {
            x: LEFT + pw / 2.0,
            y: H - 20.0,
            text: self.x_label.clone(),
            color: TEXT,
            size: 14.0,
            anchor: Anchor::Middle,
            vertical: false,
        }));
        p.push(Prim::Text(TextPrim {
            x: 24.0,
            y: TOP + ph / 2.0,
            text: self.y_label.clone(),
            color: TEXT,
            size: 14.0,
            anchor: Anchor::Middle,
            vertical: true,
        }));
        p.push(Prim::Text(TextPrim {
            x: W / 2.0,
            y: 28.0,
            text: self.title.clone(),
            color: TEXT,
            size: 18.0,
            anchor: Anchor::Middle,
            vertical: false,
        }));
        if let Some(note) = &self.note {
            p.push(Prim::Text(TextPrim {
                x: W / 2.0,
                y: 50.0,
                text: note.clone(),
                color: (90, 90, 90),
                size: 12.0,
                anchor: Anchor::Middle,
                vertical: false,
            }));
        }
        // Fault markers.
        for (i, m) in self.markers.iter().enumerate() {
            p.push(Prim::Line(LinePrim {
                a: (px(m.x), TOP),
                b: (px(m.x), TOP + ph),
                color: FAULT,
                width: 1.5,
                dashed: true,
            }));
            p.push(Prim::Text(TextPrim {
                x: px(m.x) + 4.0,
                y: TOP + 16.0 + 14.0 * (i % 3) as f64,
                text: m.label.clone(),
                color: FAULT,
                size: 12.0,
                anchor: Anchor::Start,
                vertical: false,
            }));
        }
        // Series and legend.
        let mut legend_x = 0.0;
        for s in &self.series {
            for w in s.points.windows(2) {
                p.push(Prim::Line(LinePrim {
                    a: (px(w[0].0), py(w[0].1)),
                    b: (px(w[1].0), py(w[1].1)),
                    color: s.color,
                    width: 2.0,
                    dashed: false,
                }));
            }
            if s.points.len() <= 12 {
                for q in &s.points {
                    p.push(Prim::Rect {
                        x: px(q.0) - 3.0,
                        y: py(q.1) - 3.0,
                        w: 6.0,
                        h: 6.0,
                        color: s.color,
                    });
                }
            }
            // Legend: one row above the plot, from the left.
            let lx = LEFT + legend_x;
            legend_x += 40.0 + 8.0 * s.name.chars().count() as f64;
            let ly = TOP - 10.0;
            p.push(Prim::Rect {
                x: lx,
                y: ly - 5.0,
                w: 18.0,
                h: 4.0,
                color: s.color,
            });
            p.push(Prim::Text(TextPrim {
                x: lx + 24.0,
                y: ly,
                text: s.name.clone(),
                color: TEXT,
                size: 12.0,
                anchor: Anchor::Start,
                vertical: false,
            }));
        }
        p
    }

    pub fn svg(&self) -> String {
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
             font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
        );
        let rgb = |c: Rgb| format!("rgb({},{},{})", c.0, c.1, c.2);
        for prim in self.layout() {
            match prim {
                Prim::Line(LinePrim {
                    a,
                    b,
                    color,
                    width,
                    dashed,
                }) => {
                    let _ = writeln!(
                        out,
                        "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"{width}\"{}/>",
                        a.0,
                        a.1,
                        b.0,
                        b.1,
                        rgb(color),
                        if dashed { " stroke-dasharray=\"6,4\"" } else { "" }
                    );
                }
                Prim::Rect { x, y, w, h, color } => {
                    let _ = writeln!(
                        out,
                        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\"/>",
                        rgb(color)
                    );
                }
                Prim::Text(TextPrim {
                    x,
                    y,
                    text,
                    color,
                    size,
                    anchor,
                    vertical,
                }) => {
                    let anchor = match anchor {
                        Anchor::Start => "start",
                        Anchor::Middle => "middle",
                        Anchor::End => "end",
                    };
                    let rotate = if vertical {
                        format!(" transform=\"rotate(-90 {x:.1} {y:.1})\"")
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        out,
                        "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" fill=\"{}\" text-anchor=\"{anchor}\"{rotate}>{}</text>",
                        rgb(color),
                        xml_escape(&text)
                    );
                }
            }
        }
        out.push_str("</svg>\n");
        out
    }

    pub fn png(&self) -> anyhow::Result<Vec<u8>> {
        let mut c = Canvas::new(W as usize, H as usize);
        for prim in self.layout() {
            match prim {
                Prim::Line(l) => c.line(&l),
                Prim::Rect { x, y, w, h, color } => c.rect(x, y, w, h, color),
                Prim::Text(t) => c.text(&t),
            }
        }
        c.encode()
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        self.px[i] = c.0;
        self.px[i + 1] = c.1;
        self.px[i + 2] = c.2;
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, c: Rgb) {
        for yy in y.round() as i64..(y + h).round() as i64 {
            for xx in x.round() as i64..(x + w).round() as i64 {
                self.set(xx, yy, c);
            }
        }
    }

    fn line(&mut self, l: &LinePrim) {
        let LinePrim {
            a,
            b,
            color: c,
            width,
            dashed,
        } = *l;
        let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        let steps = (len * 2.0).ceil().max(1.0) as usize;
        let half = (width / 2.0).max(0.5);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            if dashed && ((t * len) as usize % 10) >= 6 {
                continue;
            }
            let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            let r = half.ceil() as i64;
            for dy in -r..r {
                for dx in -r..r {
                    self.set(
                        (x + dx as f64 + 0.5).floor() as i64,
                        (y + dy as f64 + 0.5).floor() as i64,
                        c,
                    );
                }
            }
        }
    }

    /// 8×8 glyphs, scaled to about `size` pixels high; `y` is the baseline.
    #[allow(clippy::too_many_arguments)]
    fn text(&mut self, t: &TextPrim) {
        use font8x8::UnicodeFonts;
        let TextPrim {
            x,
            y,
            ref text,
            color: c,
            size,
            anchor,
            vertical,
        } = *t;
        let s = text.as_str();
        // 8 px glyphs for small print, doubled for titles.
        let scale = if size > 16.0 { 2 } else { 1 };
        let adv = 8 * scale;
        let total = adv * s.chars().count() as i64;
        let offset = match anchor {
            Anchor::Start => 0,
            Anchor::Middle => total / 2,
            Anchor::End => total,
        };
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) == 0 {
                        continue;
                    }
                    for sy in 0..scale {
                        for sx in 0..scale {
                            // Along the text and across it, before rotation.
                            let along = i as i64 * adv + col * scale + sx - offset;
                            let across = row as i64 * scale + sy - 7 * scale;
                            let (px, py) = if vertical {
                                (x as i64 + across + 4 * scale, y as i64 - along)
                            } else {
                                (x as i64 + along, y as i64 + across)
                            };
                            self.set(px, py, c);
                        }
                    }
                }
            }
        }
    }

    fn encode(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(&self.px)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        let (top, t) = ticks(93.0, 10);
        assert_eq!(top, 100.0);
        assert_eq!(t.len(), 11);
        let (top, _) = ticks(4217.0, 6);
        assert_eq!(top, 5000.0);
    }

    #[test]
    fn renders_both_formats() {
        let chart = Chart {
            title: "throughput".into(),
            x_label: "time (s)".into(),
            y_label: "messages/s".into(),
            series: vec![Series {
                name: "deliveries/s".into(),
                points: (0..60).map(|i| (i as f64, (i % 7) as f64 * 10.0)).collect(),
                color: PALETTE[0],
            }],
            markers: vec![Marker {
                x: 30.0,
                label: "kill n2".into(),
            }],
            note: Some("a note".into()),
            x_integer: false,
        };
        let svg = chart.svg();
        assert!(svg.starts_with("<svg") && svg.contains("kill n2") && svg.contains("messages/s"));
        let png = chart.png().expect("png");
        assert_eq!(&png[1..4], b"PNG");
        assert!(png.len() > 2000);
    }
}
