//! Quantiles of a Prometheus histogram between two scrapes, as `histogram_quantile` computes them:
//! the bucket that holds the rank, and a linear guess inside it.

/// Cumulative bucket counts (`le`, count) of histogram `name` in a Prometheus text exposition,
/// summed over its series, in the order of `le`.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let series = format!("{name}_bucket{{");
    let mut out: Vec<(f64, u64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&series)) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let Some(le) = labels.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        let Ok(count) = value.trim().parse::<f64>() else { continue };
        match out.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += count as u64,
            None => out.push((le, count as u64)),
        }
    }
    out.retain(|(le, _)| !le.is_nan());
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The growth of every bucket from `before` to `after` (buckets missing before count from 0).
pub fn since(before: &[(f64, u64)], after: &[(f64, u64)]) -> Vec<(f64, u64)> {
    after
        .iter()
        .map(|(le, n)| {
            let was = before.iter().find(|(b, _)| b == le).map_or(0, |(_, c)| *c);
            (*le, n.saturating_sub(was))
        })
        .collect()
}

/// The `q` quantile (0..1) of cumulative `buckets`, in the buckets' unit; `None` when they hold
/// nothing. A rank in the `+Inf` bucket reads as the largest finite bound.
pub fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for (le, count) in buckets {
        if *count as f64 >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = (count - below) as f64;
            let fraction = if inside > 0.0 { (rank - below as f64) / inside } else { 1.0 };
            return Some(lower + (le - lower) * fraction);
        }
        (lower, below) = (*le, *count);
    }
    Some(lower)
}

/// How many observations the cumulative `buckets` hold.
pub fn count(buckets: &[(f64, u64)]) -> u64 {
    buckets.last().map_or(0, |(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE agentfleet_step_overhead_seconds histogram\n\
        agentfleet_step_overhead_seconds_bucket{le=\"0.001\"} 50\n\
        agentfleet_step_overhead_seconds_bucket{le=\"0.002\"} 90\n\
        agentfleet_step_overhead_seconds_bucket{le=\"0.01\"} 99\n\
        agentfleet_step_overhead_seconds_bucket{le=\"+Inf\"} 100\n\
        agentfleet_step_overhead_seconds_sum 0.2\n\
        agentfleet_step_overhead_seconds_count 100\n\
        agentfleet_step_duration_seconds_bucket{le=\"0.001\"} 7\n";

    #[test]
    fn reads_the_buckets_of_one_histogram() {
        let b = buckets(TEXT, "agentfleet_step_overhead_seconds");
        assert_eq!(b.len(), 4);
        assert_eq!(b[0], (0.001, 50));
        assert_eq!(count(&b), 100);
    }

    #[test]
    fn interpolates_inside_the_bucket_of_the_rank() {
        let b = buckets(TEXT, "agentfleet_step_overhead_seconds");
        assert!((quantile(&b, 0.5).unwrap_or(0.0) - 0.001).abs() < 1e-9);
        // Rank 70 is half-way through the (0.001, 0.002] bucket's 40.
        assert!((quantile(&b, 0.7).unwrap_or(0.0) - 0.0015).abs() < 1e-9);
        assert!((quantile(&b, 0.99).unwrap_or(0.0) - 0.01).abs() < 1e-9);
        assert_eq!(quantile(&b, 1.0), Some(0.01));
    }

    #[test]
    fn measures_only_what_came_between_two_scrapes() {
        let before = [(0.001, 40), (f64::INFINITY, 40)];
        let after = [(0.001, 50), (f64::INFINITY, 60)];
        let d = since(&before, &after);
        assert_eq!(d, [(0.001, 10), (f64::INFINITY, 20)]);
        assert_eq!(quantile(&since(&after, &after), 0.5), None);
    }
}
