//! The dashboard at `GET /`: one HTML page, a script and a stylesheet, built into the binary
//! (`src/dashboard/`; no CDN, no build step, no network at run time). The page only calls the
//! `/v1` API, with the same validation as any client; with a token configured it asks for it
//! once and keeps it in the tab's `sessionStorage`. The three files need no token themselves:
//! they hold no data.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The dashboard's paths, served without a token.
pub(crate) const PATHS: [&str; 3] = ["/", "/dashboard/app.js", "/dashboard/style.css"];

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Scripts and styles from this server only; nothing inline, nothing framed.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(crate) async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        for path in &PATHS[1..] {
            assert!(INDEX_HTML.contains(&format!("\"{path}\"")), "index.html does not load {path}");
        }
        // No inline script or handler (the CSP would block it) and nothing from elsewhere.
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains(" onclick="), "inline script in index.html");
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            // The SVG namespace is a name, not a fetch.
            let text = text.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "an external URL in an asset");
        }
        assert!(!APP_JS.contains("innerHTML"), "app.js must build DOM from text, never parse server data as HTML");
    }

    #[test]
    fn every_api_path_the_script_calls_is_served() {
        // Each `/v1/...` literal prefix in app.js must be the start of a served route.
        let mut calls = 0;
        for (i, _) in APP_JS.match_indices("`/v1/").chain(APP_JS.match_indices("\"/v1/")) {
            let rest = &APP_JS[i + 1..];
            let end = rest.find(['`', '"', '?', '$']).unwrap_or(rest.len());
            let prefix = &rest[..end];
            calls += 1;
            assert!(
                crate::api::ROUTES.iter().any(|(_, route)| route.starts_with(prefix)),
                "app.js calls {prefix}, which no route serves"
            );
        }
        assert!(calls >= 8, "found only {calls} API calls in app.js");
    }
}
