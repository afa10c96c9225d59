//! The agents' memory: VmRSS samples read through pid files, their per-minute medians and their
//! trend — across incarnations at the same age for a process restarted during the run.

use std::collections::BTreeMap;

use serde::Serialize;

/// One reading of a process's resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RssSample {
    /// Seconds into the run.
    pub at_seconds: f64,
    /// The process (a new pid: a new incarnation).
    pub pid: u32,
    /// VmRSS, in kB.
    pub rss_kb: u64,
}

/// The median of `values` (none when empty).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The least-squares slope of `points` (x, y); none with fewer than three points or one x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn mb(kb: u64) -> f64 {
    kb as f64 * 1024.0 / 1e6
}

/// The median RSS of one minute of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteMedian {
    /// Minute of the run, from 0.
    pub minute: u32,
    /// Median of its samples, MB.
    pub median_mb: f64,
    /// Samples in it.
    pub samples: usize,
}

/// How a process's memory moved after the warm-up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RssTrend {
    /// Which points the slope is drawn through.
    pub method: String,
    /// (minute of the run, MB).
    pub points: Vec<(f64, f64)>,
    /// Least-squares slope through `points`, MB per minute.
    pub slope_mb_per_minute: Option<f64>,
}

/// The trend of `samples`. A process that lived through the run after `warm_up` (seconds) is
/// judged on every sample after it. A process restarted during the run starts afresh each time, so
/// a slope through all its samples would only draw the saw of its restarts: each incarnation is
/// taken at the same age instead — the median of its samples aged `phase` (seconds) — and the
/// slope drawn through those, one point per incarnation.
pub fn rss_trend(samples: &[RssSample], warm_up: f64, phase: (f64, f64)) -> RssTrend {
    // Incarnations in order, each with the time of its first sample (its start, to a sample).
    let mut incarnations: Vec<(u32, f64)> = Vec::new();
    for s in samples {
        if !incarnations.iter().any(|(pid, _)| *pid == s.pid) {
            incarnations.push((s.pid, s.at_seconds));
        }
    }
    let after_warm_up: Vec<&RssSample> =
        samples.iter().filter(|s| s.at_seconds >= warm_up).collect();
    let restarted = after_warm_up.iter().any(|s| s.pid != after_warm_up[0].pid);
    if !restarted {
        let points: Vec<(f64, f64)> = after_warm_up
            .iter()
            .map(|s| (s.at_seconds / 60.0, mb(s.rss_kb)))
            .collect();
        return RssTrend {
            method: format!(
                "every sample after the warm-up ({:.0} s), one incarnation",
                warm_up
            ),
            slope_mb_per_minute: slope(&points),
            points,
        };
    }
    let mut points = Vec::new();
    for (pid, start) in &incarnations {
        let mut at_phase: Vec<f64> = samples
            .iter()
            .filter(|s| s.pid == *pid && (phase.0..=phase.1).contains(&(s.at_seconds - start)))
            .map(|s| mb(s.rss_kb))
            .collect();
        if let Some(m) = median(&mut at_phase) {
            points.push(((start + (phase.0 + phase.1) / 2.0) / 60.0, m));
        }
    }
    RssTrend {
        method: format!(
            "restarted ({} incarnations): the median of each incarnation aged {:.0}-{:.0} s",
            incarnations.len(),
            phase.0,
            phase.1
        ),
        slope_mb_per_minute: slope(&points),
        points,
    }
}

/// Median RSS per minute of the run.
pub fn minute_medians(samples: &[RssSample]) -> Vec<MinuteMedian> {
    let mut minutes: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for s in samples {
        minutes
            .entry((s.at_seconds / 60.0) as u32)
            .or_default()
            .push(mb(s.rss_kb));
    }
    minutes
        .into_iter()
        .filter_map(|(minute, mut values)| {
            let samples = values.len();
            median(&mut values).map(|median_mb| MinuteMedian {
                minute,
                median_mb,
                samples,
            })
        })
        .collect()
}

/// What the soak saw of one process's memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RssSummary {
    /// The name given with --watch-rss.
    pub name: String,
    /// Samples read.
    pub samples: usize,
    /// Distinct pids seen.
    pub incarnations: usize,
    /// Lowest and highest sample, MB.
    pub min_mb: f64,
    /// Highest sample, MB.
    pub max_mb: f64,
    /// Median per minute.
    pub per_minute: Vec<MinuteMedian>,
    /// After the warm-up.
    pub trend: RssTrend,
}

impl RssSummary {
    /// The summary of `samples` of process `name`: trend after `warm_up`, or at `phase` across
    /// incarnations (seconds; see [`rss_trend`]).
    pub(super) fn of(name: &str, samples: &[RssSample], warm_up: f64, phase: (f64, f64)) -> Self {
        let mut pids: Vec<u32> = samples.iter().map(|s| s.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        let values = samples.iter().map(|s| mb(s.rss_kb));
        Self {
            name: name.to_owned(),
            samples: samples.len(),
            incarnations: pids.len(),
            min_mb: values.clone().fold(f64::INFINITY, f64::min),
            max_mb: values.fold(0.0, f64::max),
            per_minute: minute_medians(samples),
            trend: rss_trend(samples, warm_up, phase),
        }
    }
}

/// VmRSS of the process whose pid `pidfile` holds, in kB (none while it is being restarted).
pub(super) fn read_rss(pidfile: &std::path::Path) -> Option<(u32, u64)> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((pid, kb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_slope_of_small_sets() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(
            slope(&[(0.0, 1.0), (1.0, 3.0)]),
            None,
            "two points: no trend"
        );
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]), None);
        let s = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]).unwrap();
        assert!((s - 2.0).abs() < 1e-9, "{s}");
    }

    fn sample(at_seconds: f64, pid: u32, mb: f64) -> RssSample {
        RssSample {
            at_seconds,
            pid,
            rss_kb: (mb * 1e6 / 1024.0).round() as u64,
        }
    }

    #[test]
    fn a_process_never_restarted_is_judged_on_every_sample_after_the_warm_up() {
        // Grows fast during the warm-up, then 0.1 MB a minute.
        let samples: Vec<RssSample> = (0..600)
            .step_by(2)
            .map(|t| {
                let t = t as f64;
                let mb = if t < 120.0 {
                    10.0 + t / 12.0
                } else {
                    20.0 + (t - 120.0) / 600.0
                };
                sample(t, 7, mb)
            })
            .collect();
        let trend = rss_trend(&samples, 120.0, (20.0, 28.0));
        assert!(trend.method.contains("one incarnation"), "{}", trend.method);
        assert!(trend.points.iter().all(|p| p.0 >= 2.0));
        let s = trend.slope_mb_per_minute.unwrap();
        assert!((s - 0.1).abs() < 0.01, "{s}");
    }

    #[test]
    fn a_restarted_process_is_compared_across_incarnations_at_the_same_age() {
        // Restarted every minute at :30; each incarnation grows from 15 MB over its life, and
        // each starts 0.3 MB higher than the one before: that is the trend, not the saw.
        let mut samples = Vec::new();
        for t in (0..600).step_by(2) {
            let t = t as f64;
            let incarnation = ((t + 30.0) / 60.0).floor();
            let start = (incarnation * 60.0 - 30.0).max(0.0);
            let age = t - start;
            samples.push(sample(
                t,
                100 + incarnation as u32,
                15.0 + age / 10.0 + 0.3 * incarnation,
            ));
        }
        let trend = rss_trend(&samples, 120.0, (20.0, 28.0));
        assert!(trend.method.contains("11 incarnations"), "{}", trend.method);
        assert_eq!(trend.points.len(), 11);
        let s = trend.slope_mb_per_minute.unwrap();
        assert!((s - 0.3).abs() < 0.05, "{s}");
    }

    #[test]
    fn minute_medians_group_samples_by_minute_of_the_run() {
        let samples = [
            sample(1.0, 1, 10.0),
            sample(59.0, 1, 12.0),
            sample(61.0, 2, 20.0),
        ];
        let minutes = minute_medians(&samples);
        assert_eq!(minutes.len(), 2);
        assert_eq!((minutes[0].minute, minutes[0].samples), (0, 2));
        assert!((minutes[0].median_mb - 11.0).abs() < 0.01);
        assert!((minutes[1].median_mb - 20.0).abs() < 0.01);
    }
}
