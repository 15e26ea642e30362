//! Per-VE load averages, approximated.
//!
//! The kernel keeps load averages only system-wide. Sampling every VE every
//! 5 seconds (as lxcfs does) costs a walk over all tasks of all VEs even when
//! nobody looks; instead each VE's averages are updated when its loadavg is
//! read: the runnable count seen now is folded in with the kernel's decay
//! constants weighted by the time since the previous read. Between reads the
//! load is assumed constant, so a VE whose loadavg is read rarely shows a
//! coarser curve; the first read shows the current count in all three.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Averaging windows of the three load averages, in seconds.
const WINDOWS_SECONDS: [f64; 3] = [60.0, 300.0, 900.0];

/// Folds `runnable` (observed now) into `previous` after `elapsed_seconds`.
pub fn decay_load(previous: [f64; 3], runnable: f64, elapsed_seconds: f64) -> [f64; 3] {
    let elapsed = elapsed_seconds.max(0.0);
    let mut next = previous;
    for (average, window) in next.iter_mut().zip(WINDOWS_SECONDS) {
        let keep = (-elapsed / window).exp();
        *average = *average * keep + runnable * (1.0 - keep);
    }
    next
}

struct LoadState {
    averages: [f64; 3],
    last_update: Instant,
}

/// Load averages of all VEs, updated on read. Entries of VEs that vanished are
/// removed by [`LoadTracker::forget`].
#[derive(Default)]
pub struct LoadTracker {
    states: Mutex<HashMap<String, LoadState>>,
}

impl LoadTracker {
    /// Records `runnable` tasks of `ve_id` at `now` and returns the averages.
    pub fn observe(&self, ve_id: &str, runnable: u64, now: Instant) -> [f64; 3] {
        let runnable = runnable as f64;
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = states.entry(ve_id.to_string()).or_insert(LoadState {
            averages: [runnable; 3],
            last_update: now,
        });
        let elapsed = now
            .saturating_duration_since(state.last_update)
            .as_secs_f64();
        state.averages = decay_load(state.averages, runnable, elapsed);
        state.last_update = now;
        state.averages
    }

    pub fn forget(&self, ve_id: &str) {
        self.states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(ve_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn decay_moves_towards_the_sample() {
        let after_minute = decay_load([0.0; 3], 1.0, 60.0);
        assert!((after_minute[0] - (1.0 - (-1.0f64).exp())).abs() < 1e-9);
        assert!(after_minute[0] > after_minute[1] && after_minute[1] > after_minute[2]);
        assert_eq!(decay_load([2.0, 2.0, 2.0], 5.0, 0.0), [2.0, 2.0, 2.0]);
        assert_eq!(decay_load([2.0, 2.0, 2.0], 5.0, -3.0), [2.0, 2.0, 2.0]);
        let long = decay_load([0.0; 3], 4.0, 1e6);
        assert!(long.iter().all(|average| (average - 4.0).abs() < 1e-9));
    }

    #[test]
    fn tracker_starts_at_current_count_and_decays() {
        let tracker = LoadTracker::default();
        let start = Instant::now();
        assert_eq!(tracker.observe("ve1", 3, start), [3.0; 3]);
        let later = tracker.observe("ve1", 0, start + Duration::from_secs(60));
        assert!(later[0] < 1.2 && later[0] > 1.0);
        assert_eq!(
            tracker.observe("ve2", 1, start),
            [1.0; 3],
            "VEs are independent"
        );
        tracker.forget("ve1");
        assert_eq!(tracker.observe("ve1", 0, start), [0.0; 3]);
    }
}
