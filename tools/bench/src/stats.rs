//! Summaries of repeated samples: median, nearest-rank percentiles, range.

/// Index of the nearest-rank `p`-th percentile (0 < p ≤ 100) in a sorted
/// slice of `n` values: the smallest value with at least `p` % of the
/// values at or below it.
pub fn rank(n: usize, p: f64) -> usize {
    let r = (p / 100.0 * n as f64).ceil() as usize;
    r.clamp(1, n.max(1)) - 1
}

/// What a row reports of its samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    /// The middle value (the mean of the two middle ones for an even count).
    pub median: f64,
    pub p95: f64,
    pub max: f64,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none (or one is NaN).
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            n,
            min: v[0],
            median,
            p95: v[rank(n, 95.0)],
            max: v[n - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(rank(20, 95.0), 18);
        assert_eq!(rank(100, 99.0), 98);
        assert_eq!(rank(100, 50.0), 49);
        assert_eq!(rank(1, 99.0), 0);
        assert_eq!(rank(0, 99.0), 0);
        let samples: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(
            s,
            Summary {
                n: 20,
                min: 1.0,
                median: 10.5,
                p95: 19.0,
                max: 20.0
            }
        );
        assert_eq!(Summary::of(&[3.0]).map(|s| s.median), Some(3.0));
        assert_eq!(Summary::of(&[]), None);
    }
}
