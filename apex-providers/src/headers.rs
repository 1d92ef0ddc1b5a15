//! Parsing the providers' retry and rate-limit headers.

use std::time::Duration;

use apex_core::provider::{LimitBucket, RateLimitSnapshot};
use reqwest::header::HeaderMap;

/// Seconds as a duration; `None` for a negative, non-finite or absurdly
/// large value (a garbled header must not crash the client).
fn seconds(secs: f64) -> Option<Duration> {
    (secs >= 0.0)
        .then(|| Duration::try_from_secs_f64(secs).ok())
        .flatten()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The server's requested delay: `retry-after-ms` (milliseconds) first, then
/// `retry-after` as seconds (fractions allowed) or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(wait) = header(headers, "retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| seconds(ms / 1000.0))
    {
        return Some(wait);
    }
    let value = header(headers, "retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs);
    }
    let when = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let wait = when.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

/// Parses a Go-style duration as OpenAI sends it: `6m0s`, `1s`, `12ms`,
/// `1h2m3.5s`, `250us`.
pub fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * seconds;
        rest = tail;
    }
    seconds(total)
}

/// The time until an RFC 3339 instant (Anthropic's `*-reset` headers).
pub fn until_rfc3339(text: &str) -> Option<Duration> {
    let when: jiff::Timestamp = text.parse().ok()?;
    let wait = when.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

fn bucket(
    headers: &HeaderMap,
    limit: &str,
    remaining: &str,
    reset: &str,
    parse_reset: fn(&str) -> Option<Duration>,
) -> Option<LimitBucket> {
    let b = LimitBucket {
        limit: header(headers, limit).and_then(|v| v.parse().ok()),
        remaining: header(headers, remaining).and_then(|v| v.parse().ok()),
        reset_after: header(headers, reset).and_then(parse_reset),
    };
    (b != LimitBucket::default()).then_some(b)
}

/// OpenAI's `x-ratelimit-*` headers.
pub fn openai_rate_limits(headers: &HeaderMap) -> RateLimitSnapshot {
    RateLimitSnapshot {
        requests: bucket(
            headers,
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            go_duration,
        ),
        tokens: bucket(
            headers,
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
            go_duration,
        ),
        input_tokens: None,
        output_tokens: None,
    }
}

/// Anthropic's `anthropic-ratelimit-*` headers.
pub fn anthropic_rate_limits(headers: &HeaderMap) -> RateLimitSnapshot {
    let b = |name: &str| {
        bucket(
            headers,
            &format!("anthropic-ratelimit-{name}-limit"),
            &format!("anthropic-ratelimit-{name}-remaining"),
            &format!("anthropic-ratelimit-{name}-reset"),
            until_rfc3339,
        )
    };
    RateLimitSnapshot {
        requests: b("requests"),
        tokens: b("tokens"),
        input_tokens: b("input-tokens"),
        output_tokens: b("output-tokens"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn absurd_durations_are_refused_not_fatal() {
        assert_eq!(go_duration("99999999999999999999999h"), None);
        let mut headers = HeaderMap::new();
        headers.insert("retry-after-ms", "1e300".parse().unwrap());
        headers.insert("retry-after", "1e300".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(go_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("5x"), None);
        assert_eq!(go_duration(""), None);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "3")])),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "1.5")])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "250"), ("retry-after", "9")])),
            Some(Duration::from_millis(250))
        );
        let past = retry_after(&headers(&[(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        )]));
        assert_eq!(past, Some(Duration::ZERO));
        let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30);
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&soon)
            .unwrap();
        let wait = retry_after(&headers(&[("retry-after", &date)])).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?} from {date}"
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn rate_limit_headers() {
        let o = openai_rate_limits(&headers(&[
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]));
        let t = o.tokens.unwrap();
        assert_eq!((t.limit, t.remaining), (Some(150_000), Some(149_984)));
        assert_eq!(t.reset_after, Some(Duration::from_secs(360)));
        assert!(o.requests.is_none());

        let reset = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(20)).to_string();
        let a = anthropic_rate_limits(&headers(&[
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "12000"),
            ("anthropic-ratelimit-input-tokens-reset", &reset),
        ]));
        let i = a.input_tokens.unwrap();
        assert_eq!(i.remaining, Some(12_000));
        assert!(i.reset_after.unwrap() > Duration::from_secs(15));
    }
}
