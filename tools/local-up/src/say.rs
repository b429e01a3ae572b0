//! The demo's output: numbered, timed steps and indented lines under them.

use std::time::Instant;

/// Number of steps the demo shows.
pub const STEPS: usize = 9;

/// Prints one numbered step and returns when it started.
pub fn step(n: usize, title: &str) -> Instant {
    println!("\n[{n}/{STEPS}] {title}");
    Instant::now()
}

/// Ends a step: how long it took.
pub fn done(since: Instant) {
    println!("      ok ({:.1}s)", since.elapsed().as_secs_f64());
}

/// One line under the current step.
pub fn info(line: &str) {
    println!("      {line}");
}
