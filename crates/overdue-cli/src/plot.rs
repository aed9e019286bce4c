//! `--plot DIR` of `overdue bench` and `overdue bench orders`: SVG plots of a run, written
//! beside its JSON report.
//!
//! Two plots per run:
//! - **lateness**: the cumulative distribution of firing lateness (share of firings at most
//!   *x* ms late, *x* on a log scale), one line per phase, with p50, p99 and the maximum marked
//!   and stated in the legend. Lateness is recorded by the bench anyway (an HDR histogram);
//!   plotting reads that histogram after the run.
//! - **throughput**: events per second over the run (timers scheduled and fired, or orders
//!   created, paid and closed), with the bench's phases marked.
//!
//! The throughput lines come from a [`Sampler`]: a thread that reads the bench's cumulative
//! counters every [`SAMPLE_EVERY`] and keeps `(time, counts)`. The measured path does no more
//! work than before: the counters are the ones the bench keeps (or one atomic add per batch),
//! and the sampler only loads them.
//!
//! Rendering uses plotters' SVG backend into a string, then one `std::fs::write`, so a
//! directory that cannot be written is an error with its path, never a panic. Text is plain SVG
//! `<text>` in a generic sans-serif family (no font files are read).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::util::thousands;

/// How often the [`Sampler`] reads the counters: short enough to show a phase of under a
/// second, long enough that a rate averages over several of the steady phase's 10 ms slices.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Pixel size of every plot.
const SIZE: (u32, u32) = (960, 540);
/// Font family of all text (the viewer picks the face).
const FONT: &str = "sans-serif";
const TITLE_PT: u32 = 22;
const DESC_PT: u32 = 16;
const LABEL_PT: u32 = 14;
const MARK_PT: u32 = 13;
/// Left edge of the lateness axis, ms: a log axis cannot show 0, and `F(1 ms)` (share at most
/// 1 ms late, 0 ms included) is where the curve starts.
const LATENESS_MIN_MS: f64 = 1.0;
/// Line colours, in series order (colour-blind-safe "tab10" hues).
const COLOURS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// A directory plots are written into; made (and checked writable) before the run starts, so a
/// bad `--plot` fails in a second rather than after the benchmark.
#[derive(Debug, Clone)]
pub struct PlotDir {
    dir: PathBuf,
}

impl PlotDir {
    /// Creates `dir` (and its parents) if missing and checks that a file can be made in it.
    pub fn create(dir: &Path) -> anyhow::Result<PlotDir> {
        std::fs::create_dir_all(dir).with_context(|| format!("--plot {}: cannot create the directory", dir.display()))?;
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("--plot {}: cannot write into the directory", dir.display()))?;
        Ok(PlotDir { dir: dir.to_owned() })
    }

    /// Writes `contents` to `DIR/file`; returns the path.
    pub fn write(&self, file: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(file);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes `value` as pretty JSON to `DIR/file`.
    pub fn json(&self, file: &str, value: &impl serde::Serialize) -> anyhow::Result<PathBuf> {
        let mut text = serde_json::to_string_pretty(value)?;
        text.push('\n');
        self.write(file, &text)
    }

    /// Draws the lateness distributions of `series` into `DIR/file`.
    pub fn lateness(&self, file: &str, title: &str, series: &[Lateness<'_>]) -> anyhow::Result<PathBuf> {
        let svg = lateness_svg(title, series).map_err(|e| anyhow!("drawing {file}: {e}"))?;
        self.write(file, &svg)
    }

    /// Draws the rates of `timeline` into `DIR/file`.
    pub fn throughput(&self, file: &str, title: &str, y_desc: &str, timeline: &Timeline) -> anyhow::Result<PathBuf> {
        let svg = throughput_svg(title, y_desc, timeline).map_err(|e| anyhow!("drawing {file}: {e}"))?;
        self.write(file, &svg)
    }
}

/// One line of the lateness plot: a phase's name and the lateness of its firings in ms.
pub struct Lateness<'a> {
    pub name: &'a str,
    pub hist: &'a Histogram<u64>,
}

/// A named phase boundary on the throughput plot, seconds since the sampler started.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub at_secs: f64,
    pub label: String,
}

/// One line of the throughput plot: `(seconds since start, events per second)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What a [`Sampler`] saw: rates over time and the phase marks.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub rates: Vec<Rate>,
    pub marks: Vec<Mark>,
    /// Wall-clock start, ms since the Unix epoch (to place timestamped events, see
    /// [`event_rate`]).
    pub started_ms: i64,
    /// Seconds from start to the last sample.
    pub seconds: f64,
}

type Samples = Vec<(f64, Vec<u64>)>;

/// Reads cumulative counters every [`SAMPLE_EVERY`] on its own thread until [`Sampler::finish`].
pub struct Sampler {
    names: Vec<String>,
    started: Instant,
    started_ms: i64,
    marks: parking_lot::Mutex<Vec<Mark>>,
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Samples>,
}

impl Sampler {
    /// Starts sampling; `read` returns the counters named by `names`, in that order (each only
    /// grows). Dropping the sampler without `finish` stops the thread too.
    pub fn start(names: &[&str], read: impl Fn() -> Vec<u64> + Send + 'static) -> anyhow::Result<Sampler> {
        let (stop, stopped) = mpsc::channel::<()>();
        let started = Instant::now();
        let started_ms = overdue::Clock::now_ms(&overdue::SystemClock);
        // The first sample is taken here, so it precedes anything the caller does next.
        let first = (0.0, read());
        let thread = std::thread::Builder::new()
            .name("bench-sampler".to_owned())
            .spawn(move || {
                let mut samples = vec![first];
                loop {
                    let done = !matches!(stopped.recv_timeout(SAMPLE_EVERY), Err(mpsc::RecvTimeoutError::Timeout));
                    samples.push((started.elapsed().as_secs_f64(), read()));
                    if done {
                        return samples;
                    }
                }
            })
            .context("starting the sampler thread")?;
        Ok(Sampler {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            started,
            started_ms,
            marks: parking_lot::Mutex::new(Vec::new()),
            stop,
            thread,
        })
    }

    /// Marks the start of a phase at the current time.
    pub fn mark(&self, label: &str) {
        self.marks.lock().push(Mark { at_secs: self.started.elapsed().as_secs_f64(), label: label.to_owned() });
    }

    /// Takes a last sample, stops the thread and turns the counts into rates.
    pub fn finish(self) -> Timeline {
        let _ = self.stop.send(());
        let samples = self.thread.join().unwrap_or_default();
        let seconds = samples.last().map_or(0.0, |(t, _)| *t);
        Timeline { rates: rates(&self.names, &samples), marks: self.marks.into_inner(), started_ms: self.started_ms, seconds }
    }
}

/// Per-second rates between consecutive samples, placed at the middle of each interval.
fn rates(names: &[String], samples: &[(f64, Vec<u64>)]) -> Vec<Rate> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let points = samples
                .windows(2)
                .filter_map(|w| {
                    let ((t0, c0), (t1, c1)) = (&w[0], &w[1]);
                    let dt = t1 - t0;
                    let (a, b) = (c0.get(i).copied().unwrap_or(0), c1.get(i).copied().unwrap_or(0));
                    (dt > 0.0).then(|| ((t0 + t1) / 2.0, b.saturating_sub(a) as f64 / dt))
                })
                .collect();
            Rate { name: name.clone(), points }
        })
        .collect()
}

/// Events per second from their timestamps (ms since the epoch), in buckets of
/// [`SAMPLE_EVERY`] from `timeline.started_ms` to the end of the timeline (events outside are
/// left out).
pub fn event_rate(name: &str, times_ms: &[i64], timeline: &Timeline) -> Rate {
    let width_ms = SAMPLE_EVERY.as_millis() as i64;
    let buckets = ((timeline.seconds * 1000.0) as i64 / width_ms).max(1) as usize;
    let mut counts = vec![0u64; buckets];
    for t in times_ms {
        let offset = t - timeline.started_ms;
        if offset >= 0
            && let Some(c) = counts.get_mut((offset / width_ms) as usize)
        {
            *c += 1;
        }
    }
    let width = SAMPLE_EVERY.as_secs_f64();
    let points = counts.iter().enumerate().map(|(i, c)| ((i as f64 + 0.5) * width, *c as f64 / width)).collect();
    Rate { name: name.to_owned(), points }
}

type DrawResult<T> = Result<T, DrawingAreaErrorKind<std::io::Error>>;

/// `1` → "1", `2.5` → "2.5", `1000` → "1,000".
fn axis_number(v: f64) -> String {
    if v >= 1000.0 || (v.fract() == 0.0 && v >= 0.0) {
        thousands(v.round() as u64)
    } else {
        format!("{v}")
    }
}

/// The CDF of `hist` in percent as step points, from [`LATENESS_MIN_MS`] to its maximum.
fn cdf_points(hist: &Histogram<u64>) -> Vec<(f64, f64)> {
    let total = hist.len().max(1) as f64;
    let mut points = Vec::new();
    let (mut cumulative, mut below) = (0u64, 0.0);
    for v in hist.iter_recorded() {
        cumulative += v.count_since_last_iteration();
        let x = v.value_iterated_to() as f64;
        let now = cumulative as f64 * 100.0 / total;
        if x >= LATENESS_MIN_MS {
            if points.is_empty() && below > 0.0 {
                points.push((LATENESS_MIN_MS, below));
            }
            points.push((x, below));
        }
        points.push((x.max(LATENESS_MIN_MS), now));
        below = now;
    }
    points
}

fn lateness_svg(title: &str, series: &[Lateness<'_>]) -> DrawResult<String> {
    let max = series.iter().map(|s| s.hist.max()).max().unwrap_or(0).max(1) as f64;
    // Up to the next power of ten above the maximum with room for its label.
    let x_end = 10f64.powf((max * 1.5).log10().ceil()).max(10.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, TITLE_PT))
            .margin(20)
            .x_label_area_size(56)
            .y_label_area_size(72)
            .build_cartesian_2d((LATENESS_MIN_MS..x_end).log_scale(), 0.0..105.0)?;
        chart
            .configure_mesh()
            .x_desc("lateness (ms, log scale)")
            .y_desc("firings at most this late (%)")
            .axis_desc_style((FONT, DESC_PT))
            .label_style((FONT, LABEL_PT))
            .x_label_formatter(&|v| axis_number(*v))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(12)
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let (p50, p99, top) = (s.hist.value_at_quantile(0.50), s.hist.value_at_quantile(0.99), s.hist.max());
            let label = format!("{} ({} firings): p50 {} ms, p99 {} ms, max {} ms", s.name, thousands(s.hist.len()), thousands(p50), thousands(p99), thousands(top));
            chart
                .draw_series(LineSeries::new(cdf_points(s.hist), colour.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2)));
            if s.hist.is_empty() {
                continue;
            }
            let mark_font = (FONT, MARK_PT).into_font().color(&colour);
            // p50 and p99 labelled below right of their point, the maximum above left, so the
            // two near the top never overlap.
            let below_right = mark_font.pos(Pos::new(HPos::Left, VPos::Top));
            let above_left = mark_font.pos(Pos::new(HPos::Right, VPos::Bottom));
            for (q, name, v, style, offset) in [
                (50.0, "p50", p50, &below_right, (8, 4)),
                (99.0, "p99", p99, &below_right, (8, 4)),
                (100.0, "max", top, &above_left, (-8, -4)),
            ] {
                let at = ((v as f64).max(LATENESS_MIN_MS), q);
                chart.draw_series(std::iter::once(
                    EmptyElement::at(at)
                        + Circle::new((0, 0), 4, colour.filled())
                        + Text::new(format!("{name} {} ms", thousands(v)), offset, style.clone()),
                ))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .margin(12)
            .label_font((FONT, LABEL_PT))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

fn throughput_svg(title: &str, y_desc: &str, timeline: &Timeline) -> DrawResult<String> {
    let x_end = timeline
        .rates
        .iter()
        .flat_map(|r| r.points.iter().map(|p| p.0))
        .chain(timeline.marks.iter().map(|m| m.at_secs))
        .fold(timeline.seconds, f64::max)
        .max(1.0);
    let y_max = timeline.rates.iter().flat_map(|r| r.points.iter().map(|p| p.1)).fold(0.0, f64::max);
    let y_end = (y_max * 1.15).max(10.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, TITLE_PT))
            .margin(20)
            .x_label_area_size(56)
            .y_label_area_size(96)
            .build_cartesian_2d(0.0..x_end, 0.0..y_end)?;
        chart
            .configure_mesh()
            .x_desc("time since the bench started (s)")
            .y_desc(y_desc)
            .axis_desc_style((FONT, DESC_PT))
            .label_style((FONT, LABEL_PT))
            .x_label_formatter(&|v| axis_number(*v))
            .y_label_formatter(&|v| thousands(v.round().max(0.0) as u64))
            .draw()?;
        let mark_style = ShapeStyle::from(&BLACK.mix(0.45)).stroke_width(1);
        for (i, m) in timeline.marks.iter().enumerate() {
            chart.draw_series(DashedLineSeries::new([(m.at_secs, 0.0), (m.at_secs, y_end)], 6, 4, mark_style))?;
            // Staggered in two rows, so labels of phases a moment apart stay readable.
            let dy = 4 + (i % 2) as i32 * (MARK_PT as i32 + 4);
            // Near the right edge the label goes left of its line, so it is not cut off.
            let (hpos, dx) = if m.at_secs > 0.85 * x_end { (HPos::Right, -4) } else { (HPos::Left, 4) };
            let style = (FONT, MARK_PT).into_font().color(&BLACK.mix(0.7)).pos(Pos::new(hpos, VPos::Top));
            chart.draw_series(std::iter::once(EmptyElement::at((m.at_secs, y_end)) + Text::new(m.label.clone(), (dx, dy), style)))?;
        }
        for (i, r) in timeline.rates.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(r.points.iter().copied(), colour.stroke_width(2)))?
                .label(r.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .margin(12)
            .label_font((FONT, LABEL_PT))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn hist(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_max(3_600_000, 3).expect("histogram");
        for v in values {
            h.record(v).expect("in range");
        }
        h
    }

    /// The SVG is one document whose `<text>` elements are all closed.
    fn assert_svg(svg: &str) {
        assert!(svg.starts_with("<svg"), "not an SVG document: {}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"), "unterminated SVG: …{}", &svg[svg.len().saturating_sub(200)..]);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count(), "unbalanced <text> in {svg}");
        assert_eq!(svg.matches("<svg").count(), 1);
    }

    #[test]
    fn lateness_plot_has_its_title_series_and_percentiles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plots = PlotDir::create(&dir.path().join("a/b")).expect("creates nested dirs");
        // 0–4 ms for most, a tail to 60 ms; and a second, much later series.
        let steady = hist((0..1000).map(|i| i % 5).chain([20, 60]));
        let burst = hist((0..500).map(|i| 1000 + i * 2));
        let path = plots
            .lateness("lat.svg", "overdue bench: firing lateness", &[Lateness { name: "steady", hist: &steady }, Lateness { name: "burst", hist: &burst }])
            .expect("draws");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert_svg(&svg);
        for want in ["overdue bench: firing lateness", "steady (1,002 firings)", "burst (500 firings)", "p99 4 ms", "max 60 ms", "max 1,998 ms", "lateness (ms, log scale)", "firings at most this late (%)"] {
            assert!(svg.contains(want), "{want:?} missing from {svg}");
        }
    }

    #[test]
    fn cdf_starts_at_the_share_below_one_ms_and_ends_at_100() {
        let points = cdf_points(&hist([0, 0, 2, 10]));
        assert_eq!(points.first(), Some(&(1.0, 50.0)), "{points:?}");
        assert_eq!(points.last(), Some(&(10.0, 100.0)), "{points:?}");
        assert!(points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "not monotonic: {points:?}");
    }

    #[test]
    fn throughput_plot_has_its_lines_marks_and_axes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plots = PlotDir::create(dir.path()).expect("dir");
        let timeline = Timeline {
            rates: vec![
                Rate { name: "scheduled /s".into(), points: vec![(0.1, 250_000.0), (0.3, 0.0), (2.5, 10_000.0)] },
                Rate { name: "fired /s".into(), points: vec![(0.1, 0.0), (0.3, 100_000.0), (2.5, 9_000.0)] },
            ],
            marks: vec![Mark { at_secs: 0.0, label: "schedule".into() }, Mark { at_secs: 0.2, label: "fire".into() }],
            started_ms: 0,
            seconds: 3.0,
        };
        let path = plots.throughput("tp.svg", "overdue bench: throughput", "timers per second", &timeline).expect("draws");
        let svg = std::fs::read_to_string(path).expect("written");
        assert_svg(&svg);
        for want in ["overdue bench: throughput", "scheduled /s", "fired /s", "schedule", "fire", "timers per second", "time since the bench started (s)", "100,000"] {
            assert!(svg.contains(want), "{want:?} missing from {svg}");
        }
        assert!(svg.matches("<polyline").count() >= 2, "no lines in {svg}");
    }

    #[test]
    fn empty_inputs_still_draw() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plots = PlotDir::create(dir.path()).expect("dir");
        let empty = hist([]);
        assert_svg(&std::fs::read_to_string(plots.lateness("l.svg", "t", &[Lateness { name: "none", hist: &empty }]).expect("draws")).expect("read"));
        assert_svg(&std::fs::read_to_string(plots.throughput("t.svg", "t", "per s", &Timeline::default()).expect("draws")).expect("read"));
    }

    #[test]
    fn a_directory_that_cannot_be_made_or_written_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").expect("file");
        let err = PlotDir::create(&file.join("plots")).expect_err("a file is in the way");
        assert!(format!("{err:#}").contains("cannot create the directory"), "{err:#}");
        let err = PlotDir::create(&file).expect_err("a file is not a directory");
        assert!(format!("{err:#}").contains("a-file"), "{err:#}");
        // Removed after the check: the write itself fails with the path.
        let gone = dir.path().join("gone");
        let plots = PlotDir::create(&gone).expect("dir");
        std::fs::remove_dir(&gone).expect("rmdir");
        let err = plots.lateness("l.svg", "t", &[]).expect_err("no directory");
        assert!(format!("{err:#}").contains("l.svg"), "{err:#}");
    }

    #[test]
    fn the_sampler_turns_counts_into_rates_and_keeps_marks() {
        let n = Arc::new(AtomicU64::new(0));
        let read = n.clone();
        let sampler = Sampler::start(&["events /s"], move || vec![read.load(Ordering::Relaxed)]).expect("starts");
        sampler.mark("go");
        n.store(500, Ordering::Relaxed);
        let timeline = sampler.finish();
        assert_eq!(timeline.rates.len(), 1);
        assert_eq!(timeline.marks.len(), 1);
        assert_eq!(timeline.marks[0].label, "go");
        let rate = &timeline.rates[0];
        assert!(!rate.points.is_empty(), "no interval sampled");
        assert!(rate.points.iter().all(|(t, r)| *t >= 0.0 && *r >= 0.0), "{rate:?}");
        // The first sample was taken before the store and the last after it, so some interval
        // saw the 500.
        assert!(rate.points.iter().any(|(_, r)| *r > 0.0), "the increase was not seen: {rate:?}");
    }

    #[test]
    fn rates_integrate_back_to_the_counts() {
        let samples = vec![(0.0, vec![0, 0]), (0.5, vec![100, 0]), (1.0, vec![100, 40]), (2.0, vec![300, 40])];
        let rates = rates(&["a".to_owned(), "b".to_owned()], &samples);
        assert_eq!(rates[0].points, vec![(0.25, 200.0), (0.75, 0.0), (1.5, 200.0)]);
        assert_eq!(rates[1].points, vec![(0.25, 0.0), (0.75, 80.0), (1.5, 0.0)]);
    }

    #[test]
    fn event_rates_bucket_timestamps_from_the_start() {
        let timeline = Timeline { started_ms: 10_000, seconds: 1.0, ..Timeline::default() };
        let r = event_rate("closed /s", &[9_000, 10_000, 10_050, 10_250, 10_999, 12_000], &timeline);
        let per_sec: Vec<f64> = r.points.iter().map(|p| p.1).collect();
        assert_eq!(per_sec, vec![10.0, 5.0, 0.0, 0.0, 5.0], "{r:?}");
        assert!((r.points[0].0 - 0.1).abs() < 1e-9 && (r.points[4].0 - 0.9).abs() < 1e-9, "{r:?}");
    }
}
