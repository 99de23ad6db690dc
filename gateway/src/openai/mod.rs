//! OpenAI wire types: just the parts of requests Carrel reads, and the bodies it writes itself.
//!
//! Requests are forwarded as the client sent them; Carrel parses only the fields it needs and
//! leaves the rest to the upstream, so new OpenAI parameters pass through untouched.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::GatewayError;

/// The fields of an inference request body that Carrel reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFields {
    /// Public model name.
    pub model: String,
    /// Whether the client asked for server-sent events.
    pub stream: bool,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
}

impl RequestFields {
    /// Reads `model` and `stream` from a JSON object body; everything else is skipped unparsed.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(GatewayError::MalformedJson(
                "the body must be a JSON object".to_owned(),
            ));
        }
        let peek: Peek<'_> = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                GatewayError::InvalidParameter {
                    param: "model",
                    message: format!("Invalid type for 'model': {e}"),
                }
            } else {
                GatewayError::MalformedJson(e.to_string())
            }
        })?;
        let model = match peek.model {
            Some(m) if !m.is_empty() => m.into_owned(),
            _ => {
                return Err(GatewayError::InvalidParameter {
                    param: "model",
                    message: "You must provide a model parameter.".to_owned(),
                });
            }
        };
        let stream = match peek.stream {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(_) => {
                return Err(GatewayError::InvalidParameter {
                    param: "stream",
                    message: "Invalid type for 'stream': expected a boolean.".to_owned(),
                });
            }
        };
        Ok(RequestFields { model, stream })
    }
}

/// Replaces the top-level `model` of a JSON object body, keeping every other field.
pub fn rewrite_model(body: &[u8], upstream_model: &str) -> Result<Bytes, GatewayError> {
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| GatewayError::MalformedJson(e.to_string()))?;
    value.insert(
        "model".to_owned(),
        serde_json::Value::String(upstream_model.to_owned()),
    );
    Ok(Bytes::from(
        serde_json::to_vec(&value).expect("a JSON map serialises"),
    ))
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// The error.
    pub error: ErrorDetail<'a>,
}

/// The OpenAI error object.
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    /// Human-readable message.
    pub message: Cow<'a, str>,
    /// Error class.
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The request field at fault.
    pub param: Option<&'a str>,
    /// Stable code.
    pub code: &'a str,
}

impl GatewayError {
    /// The error as an OpenAI JSON body.
    pub fn body(&self) -> Bytes {
        let body = ErrorBody {
            error: ErrorDetail {
                message: Cow::Owned(self.to_string()),
                kind: self.openai_type(),
                param: self.param(),
                code: self.code(),
            },
        };
        Bytes::from(serde_json::to_vec(&body).expect("the error body serialises"))
    }
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelObject<'a> {
    /// Public model name.
    pub id: &'a str,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds when the model was added.
    pub created: i64,
    /// Who serves it.
    pub owned_by: &'a str,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    /// Always `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelObject<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream_only() {
        let f = RequestFields::parse(
            br#"{"messages":[{"role":"user","content":"hi \"there\""}],"model":"m","stream":true,"x":{"y":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            RequestFields {
                model: "m".into(),
                stream: true
            }
        );
        let f = RequestFields::parse(br#"{"model":"caf\u00e9"}"#).unwrap();
        assert_eq!(f.model, "café");
        assert!(!f.stream);
    }

    #[test]
    fn rejects_what_it_cannot_route() {
        let code = |b: &[u8]| RequestFields::parse(b).unwrap_err().code();
        assert_eq!(code(b"{nope"), "invalid_json");
        assert_eq!(code(b"[1,2]"), "invalid_json");
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(br#"{"messages":[]}"#), "invalid_parameter");
        assert_eq!(code(br#"{"model":7}"#), "invalid_parameter");
        assert_eq!(
            code(br#"{"model":"m","stream":"yes"}"#),
            "invalid_parameter"
        );
        assert_eq!(code(br#"{"model":"m"} trailing"#), "invalid_json");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = RequestFields::parse(&bytes);
        }

        #[test]
        fn agrees_with_a_full_parse(
            model in "\\PC{1,24}",
            stream in proptest::prelude::any::<Option<bool>>(),
            content in "\\PC{0,40}",
        ) {
            let mut body = serde_json::json!({
                "messages": [{"role": "user", "content": content}],
                "model": model,
                "temperature": 0.2,
            });
            if let Some(stream) = stream {
                body["stream"] = serde_json::json!(stream);
            }
            let fields = RequestFields::parse(body.to_string().as_bytes()).unwrap();
            proptest::prop_assert_eq!(fields, RequestFields { model, stream: stream.unwrap_or(false) });
        }
    }

    #[test]
    fn rewrite_keeps_other_fields() {
        let out = rewrite_model(
            br#"{"model":"public","temperature":0.5,"stream":true}"#,
            "up",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "up");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["stream"], true);
    }
}
