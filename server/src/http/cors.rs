//! CORS for browser clients (ProgressDB's TypeScript and React SDKs): `tower_http`'s
//! [`CorsLayer`] over the whole router when `http.cors_allowed_origins` lists any origin.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered by the
//! layer itself, before any handler, so before authentication. Answers to a listed origin
//! carry `Access-Control-Allow-Origin: <that origin>` and `Vary: Origin`; other origins get
//! no CORS headers, and their browsers refuse the answer. No credentials mode: the API
//! authenticates with headers, never cookies. With no origin listed there is no layer at
//! all (the default).

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The request headers browser clients send: the API key, the user and its signature.
const ALLOWED_HEADERS: [&str; 6] = [
    "authorization",
    "content-type",
    "x-api-key",
    "x-user-id",
    "x-user-signature",
    "idempotency-key",
];

/// Whether `o` is `*` or an origin `scheme://host[:port]` (http or https, no path, query or
/// user info), as browsers send it in `Origin`.
pub fn is_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let o = &o.to_ascii_lowercase();
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    let host_ok = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'[' | b']' | b':'))
    };
    // A port is what follows the last `:` outside an IPv6 literal's brackets.
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') && (!h.contains('[') || h.ends_with(']')) => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = |h: &str| {
        host_ok(h)
            && match h.strip_prefix('[') {
                Some(v6) => v6
                    .strip_suffix(']')
                    .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
                None => !h.contains([':', '[', ']']),
            }
    };
    matches!(scheme, "http" | "https")
        && host_ok(host)
        && port.is_none_or(|p| {
            p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0)
        })
        && HeaderValue::from_str(o).is_ok()
}

/// `o` as browsers send it in `Origin`: scheme and host in lowercase, without the scheme's
/// default port (`HTTPS://App.example:443` → `https://app.example`).
pub fn normalize(o: &str) -> String {
    let lower = o.to_ascii_lowercase();
    for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
        if let Some(rest) = lower.strip_prefix(scheme) {
            if let Some(host) = rest.strip_suffix(port) {
                return format!("{scheme}{host}");
            }
        }
    }
    lower
}

/// The layer for `origins` (checked by [`is_origin`] when the config was read), or `None`
/// when the list is empty. Each is compared as [`normalize`]d.
pub fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        // Echo the request's origin (never a literal `*`), as ProgressDB does.
        AllowOrigin::mirror_request()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(&normalize(o)).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
            .expose_headers([axum::http::header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_origins_match_what_browsers_send() {
        assert_eq!(normalize("HTTPS://App.Example:443"), "https://app.example");
        assert_eq!(normalize("http://x.example:80"), "http://x.example");
        assert_eq!(normalize("http://x.example:8080"), "http://x.example:8080");
        assert!(is_origin("HTTPS://App.Example:443"));
    }

    #[test]
    fn origins() {
        for ok in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "http://[::1]:5173",
        ] {
            assert!(is_origin(ok), "{ok}");
        }
        for bad in [
            "",
            "app.example.com",
            "https://",
            "ftp://x",
            "https://x/",
            "https://x/path",
            "https://x:0",
            "https://x:99999",
            "https://u@x",
            "https://x?q",
            "https://x y",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }
}
