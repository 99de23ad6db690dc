//! `/admin/docs`: a readable API reference (Swagger UI) for the document at
//! `/admin/openapi.json`, that works with no internet access.
//!
//! Every file is in the binary: Swagger UI's bundle, stylesheet and icon come from the
//! `utoipa-swagger-ui-vendored` crate (extracted by `build.rs`, nothing downloaded), and the page
//! and its start-up script from `admin/assets/docs/`. The page loads nothing from another host,
//! and its Content-Security-Policy says so to the browser: scripts, styles, images and requests
//! from this origin only.
//!
//! Like the document, the page needs no admin token; "Authorize" in the page takes one for
//! trying admin calls.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::AdminError;

/// The policy of every `/admin/docs` response. `data:` images are the icons that Swagger UI's
/// stylesheet embeds; it needs no inline script or style and no `eval`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The files under `/admin/docs/`: name, content type, bytes.
const FILES: [(&str, &str, &[u8]); 5] = [
    (
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_bytes!(concat!(env!("OUT_DIR"), "/swagger-ui/swagger-ui-bundle.js")),
    ),
    (
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_bytes!(concat!(env!("OUT_DIR"), "/swagger-ui/swagger-ui.css")),
    ),
    (
        "favicon.png",
        "image/png",
        include_bytes!(concat!(env!("OUT_DIR"), "/swagger-ui/favicon-32x32.png")),
    ),
    (
        "docs.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/docs/docs.js"),
    ),
    (
        "docs.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/docs/docs.css"),
    ),
];

const INDEX: &str = include_str!("../assets/docs/index.html");

/// `GET /admin/docs` (also with a trailing slash) and `GET /admin/docs/{file}`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/admin/docs", get(page))
        .route("/admin/docs/", get(page))
        .route("/admin/docs/{file}", get(file))
}

/// The HTML page.
pub async fn page() -> Response {
    respond("text/html; charset=utf-8", INDEX.as_bytes())
}

/// One of [`FILES`], or 404.
pub async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, ..)| *n == name) {
        Some((_, content_type, bytes)) => respond(content_type, bytes),
        None => AdminError::NotFound(format!("/admin/docs/{name}")).into_response(),
    }
}

fn respond(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut resp = bytes.into_response();
    static_file_headers(resp.headers_mut(), content_type, CONTENT_SECURITY_POLICY);
    resp
}

/// The headers of a page's file built into the binary: its type, its content security policy,
/// no sniffing and no referrer. The admin reference and the kiosk page both use them.
pub fn static_file_headers(headers: &mut HeaderMap, content_type: &'static str, csp: &'static str) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}
