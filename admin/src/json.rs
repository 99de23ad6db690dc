//! The JSON body extractor: malformed JSON is 400, a missing, unknown or mistyped field is 422
//! naming that field (serde's own messages, with the path from `serde_path_to_error`).

use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::AdminError;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct AdminJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AdminJson<T> {
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| AdminError::MalformedJson(e.body_text()))?;
        parse(&bytes).map(AdminJson)
    }
}

/// Parses a body, naming the field on a schema error.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AdminError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| AdminError::MalformedJson(e.to_string()))?;
    if !value.is_object() {
        return Err(AdminError::MalformedJson(
            "the body must be a JSON object".to_owned(),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let field = named_field(&message)
            .map(|f| {
                if path == "." {
                    f.to_owned()
                } else {
                    format!("{path}.{f}")
                }
            })
            .unwrap_or(path);
        AdminError::field(field.clone(), format!("{field}: {message}"))
    })
}

/// For `#[serde(default, deserialize_with = "present")]` on an `Option<Option<T>>`: a field that
/// may be absent (the outer `None`: leave it as it is) or `null` (`Some(None)`: clear it).
pub fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

/// The field serde names in a "missing field `x`" message: the path stops at its parent. (An
/// unknown field's path already ends in the field.)
fn named_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    fn field_of(body: &str) -> String {
        match parse::<Body>(body.as_bytes()).unwrap_err() {
            AdminError::InvalidField { field, .. } => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(r#"{"name":"a"}"#), "count");
        assert_eq!(field_of(r#"{"name":"a","count":-1}"#), "count");
        assert_eq!(field_of(r#"{"name":"a","count":1,"extra":true}"#), "extra");
        assert!(matches!(
            parse::<Body>(b"{not json").unwrap_err(),
            AdminError::MalformedJson(_)
        ));
        assert!(matches!(
            parse::<Body>(b"[1]").unwrap_err(),
            AdminError::MalformedJson(_)
        ));
    }
}
