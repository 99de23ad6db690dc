//! The published API description: `/admin/openapi.json` (admin and public API in one document)
//! and `/admin/docs`, the API reference page, both without an admin token and with nothing
//! loaded from another host.

use carrel_tests::Gateway;
use carrel_tests::mock::MockUpstream;
use serde_json::Value;

async fn gateway() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&carrel_tests::config_for(&mock.base_url(), "")).await;
    (mock, gw)
}

/// The values of every `src="..."` and `href="..."` in an HTML page.
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attr in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(start) = rest.find(attr) {
            rest = &rest[start + attr.len()..];
            let end = rest.find('"').expect("a closed attribute");
            found.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    found
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_docs_page_and_its_files_are_served_without_a_token_and_stay_on_this_host() {
    let (_mock, gw) = gateway().await;
    for page in ["/admin/docs", "/admin/docs/"] {
        let resp = gw.http.get(gw.admin_url(page)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{page}");
        assert_eq!(header(&resp, "content-type"), "text/html; charset=utf-8");
    }
    let resp = gw
        .http
        .get(gw.admin_url("/admin/docs"))
        .send()
        .await
        .unwrap();
    let csp = header(&resp, "content-security-policy").to_owned();
    // Everything from this origin only; no inline script, no eval.
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert!(!csp.contains("http"), "{csp}");
    let html = resp.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "the page names no other host:\n{html}"
    );
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "no inline script or style: the policy would block it\n{html}"
    );

    let refs = references(&html);
    assert!(refs.len() >= 5, "{refs:?}");
    for r in &refs {
        assert!(
            r.starts_with('/') && !r.starts_with("//"),
            "{r} is a path on this host"
        );
        let resp = gw.http.get(gw.admin_url(r)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{r}");
        let expected = match r.rsplit('.').next().unwrap() {
            "js" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "png" => "image/png",
            "json" => "application/json",
            other => panic!("unexpected file type {other} in {r}"),
        };
        assert_eq!(header(&resp, "content-type"), expected, "{r}");
        if r.starts_with("/admin/docs/") {
            assert_eq!(header(&resp, "x-content-type-options"), "nosniff", "{r}");
        }
        let body = resp.bytes().await.unwrap();
        assert!(!body.is_empty(), "{r}");
        let text = String::from_utf8_lossy(&body);
        if r.ends_with(".css") {
            // Stylesheets load images and fonts with url(...): only data: URIs or this host.
            for (i, _) in text.match_indices("url(") {
                let target = text[i + 4..].trim_start_matches(['"', '\'']);
                assert!(
                    target.starts_with("data:") || !target.contains("//"),
                    "{r} loads {}",
                    &target[..target.len().min(60)]
                );
            }
        }
        if r == "/admin/docs/docs.js" {
            assert!(text.contains("url: \"/admin/openapi.json\""), "{text}");
            assert!(!text.contains("http"), "{text}");
        }
    }
    assert!(refs.iter().any(|r| r.ends_with("swagger-ui-bundle.js")));

    let missing = gw
        .http
        .get(gw.admin_url("/admin/docs/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn the_openapi_document_is_public_and_describes_the_admin_and_the_public_api() {
    let (_mock, gw) = gateway().await;
    let resp = gw
        .http
        .get(gw.admin_url("/admin/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    let doc: Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(doc.get("servers").is_none(), "the same document everywhere");
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{id}",
        "/healthz",
        "/readyz",
        "/admin/v1/institutions",
        "/admin/v1/providers",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
    let chat = &doc["paths"]["/v1/chat/completions"]["post"];
    assert_eq!(chat["tags"][0], "public");
    assert_eq!(chat["security"][0]["api_key"], serde_json::json!([]));
    let ok = &chat["responses"]["200"]["content"];
    assert!(ok["application/json"].is_object() && ok["text/event-stream"].is_object());
    assert_eq!(
        chat["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ChatCompletionRequest"
    );

    // Errors: the OpenAI error body, each status listing its codes.
    let schemas = &doc["components"]["schemas"];
    let detail = &schemas["ErrorDetail"]["properties"];
    for field in ["message", "type", "param", "code"] {
        assert!(detail[field].is_object(), "error.{field}");
    }
    let unauthorized = &doc["components"]["responses"]["Unauthorized"];
    assert!(
        unauthorized["description"]
            .as_str()
            .unwrap()
            .contains("`invalid_api_key`")
    );
    assert_eq!(
        unauthorized["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ErrorBody"
    );
    assert_eq!(
        chat["responses"]["401"]["$ref"],
        "#/components/responses/Unauthorized"
    );

    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["api_key"]["scheme"], "bearer");
    assert_eq!(schemes["admin_token"]["scheme"], "bearer");
    let tags: Vec<&str> = doc["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(tags.contains(&"public"), "{tags:?}");
}
