//! The kiosk page at `/kiosk`: three static files built into the binary, so a library whose
//! network blocks the internet still has it. The page itself signs patrons in and out, streams
//! answers and wipes the transcript on sign-out or idle (see `gateway/assets/kiosk/`).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, ResponseBody};

/// Only the page's own files and its own origin: no inline script or style, no framing.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// The page's files: path, content type, bytes.
const ASSETS: [(&str, &str, &[u8]); 3] = [
    (
        "/kiosk",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/kiosk/index.html"),
    ),
    (
        "/kiosk/kiosk.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/kiosk/kiosk.js"),
    ),
    (
        "/kiosk/kiosk.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/kiosk/kiosk.css"),
    ),
];

/// Whether `path` is one of the page's files (`/kiosk/` counts as the page).
pub fn is_asset(path: &str) -> bool {
    path == "/kiosk/" || ASSETS.iter().any(|(p, _, _)| *p == path)
}

/// The file at `path`; `None` when it is not one of the page's.
pub fn serve(path: &str) -> Option<Response<ResponseBody>> {
    let path = if path == "/kiosk/" { "/kiosk" } else { path };
    let (_, content_type, bytes) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    let mut resp = Response::new(body::full(Bytes::from_static(bytes)));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // A public computer: nothing of the page is kept in a shared cache or the browser's.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_files_are_served_with_their_types_and_policy() {
        for (path, ct, _) in ASSETS {
            let resp = serve(path).unwrap();
            assert_eq!(resp.headers()[header::CONTENT_TYPE], ct);
            assert_eq!(resp.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        }
        assert!(serve("/kiosk/").is_some());
        assert!(serve("/kiosk/other.js").is_none());
        // No file reaches outside: every reference in the page is to its own origin.
        let html = std::str::from_utf8(ASSETS[0].2).unwrap();
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no CDN"
        );
        assert!(
            !html.contains("<style") && !html.contains(" style="),
            "CSP: no inline style"
        );
        assert!(!html.contains("<script>"), "CSP: no inline script");
    }
}
