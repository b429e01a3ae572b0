//! Metrics made and registered in one step, under the prefix upstream gives
//! every metric of both binaries.

use prometheus::core::Collector;
use prometheus::{
    Error, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// The prefix of every metric name (`aadpodidentity_<name>`), as upstream's.
pub const NAMESPACE: &str = "aadpodidentity";

/// Makes metrics named `aadpodidentity_<name>` and registers each in its
/// registry as it is made; a name registered twice is an error.
#[derive(Clone, Copy, Debug)]
pub struct Registrar<'a>(pub &'a Registry);

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec())
}

impl Registrar<'_> {
    fn add<M: Collector + Clone + 'static>(&self, metric: M) -> Result<M, Error> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    /// A counter.
    pub fn counter(&self, name: &str, help: &str) -> Result<IntCounter, Error> {
        self.add(IntCounter::with_opts(opts(name, help))?)
    }

    /// A counter per value of `labels`.
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, Error> {
        self.add(IntCounterVec::new(opts(name, help), labels)?)
    }

    /// A gauge.
    pub fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, Error> {
        self.add(IntGauge::with_opts(opts(name, help))?)
    }

    /// A gauge per value of `labels`.
    pub fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, Error> {
        self.add(IntGaugeVec::new(opts(name, help), labels)?)
    }

    /// A histogram with `buckets`.
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, Error> {
        self.add(Histogram::with_opts(histogram_opts(name, help, buckets))?)
    }

    /// A histogram with `buckets` per value of `labels`.
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<HistogramVec, Error> {
        self.add(HistogramVec::new(
            histogram_opts(name, help, buckets),
            labels,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_registered_under_the_prefix() {
        let registry = Registry::new();
        let r = Registrar(&registry);
        r.counter("c_count", "c").unwrap().inc();
        r.counter_vec("cv_count", "cv", &["op"])
            .unwrap()
            .with_label_values(&["x"])
            .inc();
        r.gauge("g", "g").unwrap().set(2);
        r.gauge_vec("gv", "gv", &["state"])
            .unwrap()
            .with_label_values(&["waiting"])
            .set(1);
        r.histogram("h_seconds", "h", &[1.0]).unwrap().observe(0.5);
        r.histogram_vec("hv_seconds", "hv", &[1.0, 2.0], &["op"])
            .unwrap()
            .with_label_values(&["x"])
            .observe(1.5);
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .unwrap();
        for line in [
            "aadpodidentity_c_count 1",
            "aadpodidentity_cv_count{op=\"x\"} 1",
            "aadpodidentity_g 2",
            "aadpodidentity_gv{state=\"waiting\"} 1",
            "aadpodidentity_h_seconds_bucket{le=\"1\"} 1",
            "aadpodidentity_hv_seconds_bucket{op=\"x\",le=\"2\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(
            r.counter("c_count", "again").is_err(),
            "a name registered twice"
        );
    }
}
