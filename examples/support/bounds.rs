//! The least time per-minute limits allow, by the simulator's own count of
//! each request: shared by the benches that measure pacing.

/// The least time one limit allows for demand `d` in requests of at most `a`.
pub fn limit_floor(d: f64, a: f64, l: f64) -> f64 {
    if l <= 0.0 || d <= 0.0 {
        return 0.0;
    }
    let whole = if a > 0.0 && a <= l {
        60.0 * (((d / a).floor() / (l / a).floor()).ceil() - 1.0).max(0.0)
    } else {
        0.0
    };
    whole.max(60.0 * (d / l - 1.0).max(0.0))
}

/// The least time one limit allows counting requests: of the n largest
/// requests (each at least t), at most ⌊L/t⌋ share a window, so they need
/// ⌈n / ⌊L/t⌋⌉ windows; the largest over n. Tighter than `limit_floor` when
/// requests are nearly equal (⌊D/a⌋ then loses one).
pub fn count_floor(charges: &[f64], l: f64) -> f64 {
    let mut sorted: Vec<f64> = charges.iter().copied().filter(|c| *c > 0.0).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut windows: f64 = 0.0;
    for (i, t) in sorted.iter().enumerate() {
        let per = (l / t).floor();
        if per >= 1.0 {
            windows = windows.max(((i + 1) as f64 / per).ceil());
        }
    }
    60.0 * (windows - 1.0).max(0.0)
}

/// The least time a bucket of size `l`, refilled at `l` a minute, allows
/// for demand `d`: a burst of its size, then the refill rate.
pub fn bucket_floor(d: f64, l: f64) -> f64 {
    if l <= 0.0 {
        return 0.0;
    }
    60.0 * (d / l - 1.0).max(0.0)
}
