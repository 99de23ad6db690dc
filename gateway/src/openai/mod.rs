//! OpenAI wire types: just the parts of requests Carrel reads, and the bodies it writes itself.
//!
//! Requests are forwarded as the client sent them; Carrel parses only the fields it needs and
//! leaves the rest to the upstream, so new OpenAI parameters pass through untouched.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::GatewayError;
use crate::tokens::{self, Tokenizer};

/// The fields of an inference request body that Carrel reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestFields {
    /// Public model name.
    pub model: String,
    /// Whether the client asked for server-sent events.
    pub stream: bool,
    /// The output cap per choice the client set (`max_completion_tokens`, else `max_tokens`).
    pub max_tokens: Option<u64>,
    /// Which of the two fields the client used, so a clamp rewrites that one.
    pub max_tokens_param: &'static str,
    /// Choices asked for (`n`, default 1).
    pub n: u64,
    /// The client's end-user id (`user`), which names a patron. Never forwarded.
    pub user: Option<String>,
    /// Whether the client asked for a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// The sampling temperature the client set: 0 makes an answer cacheable.
    pub temperature: Option<f64>,
    /// The prompt's text, for the estimate.
    pub prompt: PromptText,
}

/// The text of a prompt (messages' contents, a completion prompt, an embedding input), joined,
/// plus token ids the client sent as numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptText {
    /// Text pieces joined by newlines.
    pub text: String,
    /// Token ids given as numbers.
    pub token_ids: u64,
    /// Chat messages (0 for other endpoints).
    pub messages: u64,
}

impl PromptText {
    /// Estimated prompt tokens with `tokenizer` (see [`crate::tokens`]).
    pub fn estimate(&self, tokenizer: Tokenizer) -> u64 {
        let framing = if self.messages > 0 {
            self.messages * tokens::PER_MESSAGE + tokens::REPLY_PRIMING
        } else {
            0
        };
        tokenizer.count(&self.text) + self.token_ids + framing
    }
}

/// Collects every string (and `text` / `content` member) below a JSON value into a
/// [`PromptText`], without building the value.
struct Collect<'s>(&'s mut PromptText);

impl<'de> serde::de::DeserializeSeed<'de> for Collect<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Collect<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("text, token ids, or arrays and objects of them")
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        if !self.0.text.is_empty() {
            self.0.text.push('\n');
        }
        self.0.text.push_str(v);
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.0.token_ids += 1;
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.0.token_ids += 1;
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Collect(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "content" || key == "text" {
                map.next_value_seed(Collect(&mut *self.0))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A prompt field, collected as it is parsed.
#[derive(Default)]
struct Collected(PromptText);

impl<'de> Deserialize<'de> for Collected {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut text = PromptText::default();
        serde::de::DeserializeSeed::deserialize(Collect(&mut text), d)?;
        Ok(Collected(text))
    }
}

/// Chat messages: each one's contents, and how many there are.
#[derive(Default)]
struct Messages(PromptText);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seq;
        impl<'de> serde::de::Visitor<'de> for Seq {
            type Value = PromptText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PromptText, A::Error> {
                let mut text = PromptText::default();
                while seq.next_element_seed(Collect(&mut text))?.is_some() {
                    text.messages += 1;
                }
                Ok(text)
            }
        }
        d.deserialize_seq(Seq).map(Messages)
    }
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
    #[serde(default)]
    n: Option<serde_json::Value>,
    #[serde(default)]
    user: Option<serde_json::Value>,
    #[serde(default)]
    stream_options: Option<serde_json::Value>,
    #[serde(default)]
    temperature: Option<serde_json::Value>,
    #[serde(default)]
    messages: Option<Messages>,
    #[serde(default)]
    prompt: Option<Collected>,
    #[serde(default)]
    input: Option<Collected>,
}

/// Most choices one request may ask for (OpenAI's own limit).
pub const MAX_CHOICES: u64 = 128;
/// Longest `user` accepted.
pub const MAX_USER_LEN: usize = 256;

fn invalid(param: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidParameter {
        param,
        message: message.into(),
    }
}

/// A positive integer field, if present and not null.
fn positive(
    param: &'static str,
    v: Option<serde_json::Value>,
) -> Result<Option<u64>, GatewayError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(invalid(
                param,
                format!("Invalid '{param}': {n}. Expected a positive integer."),
            )),
        },
        Some(_) => Err(invalid(
            param,
            format!("Invalid type for '{param}': expected an integer."),
        )),
    }
}

impl RequestFields {
    /// Reads the fields Carrel needs from a JSON object body; everything else is skipped
    /// unparsed. Rejects values Carrel cannot count with: a `max_tokens` or `n` that is not a
    /// positive integer, more than [`MAX_CHOICES`] choices, a `user` that is not a short string.
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(GatewayError::MalformedJson(
                "the body must be a JSON object".to_owned(),
            ));
        }
        let peek: Peek<'_> = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                invalid("model", format!("Invalid request body: {e}"))
            } else {
                GatewayError::MalformedJson(e.to_string())
            }
        })?;
        let model = match peek.model {
            Some(m) if !m.is_empty() => m.into_owned(),
            _ => return Err(invalid("model", "You must provide a model parameter.")),
        };
        let stream = match peek.stream {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(_) => {
                return Err(invalid(
                    "stream",
                    "Invalid type for 'stream': expected a boolean.",
                ));
            }
        };
        let completion = positive("max_completion_tokens", peek.max_completion_tokens)?;
        let legacy = positive("max_tokens", peek.max_tokens)?;
        let (max_tokens, max_tokens_param) = match (completion, legacy) {
            (Some(n), _) => (Some(n), "max_completion_tokens"),
            (None, n) => (n, "max_tokens"),
        };
        let n = positive("n", peek.n)?.unwrap_or(1);
        if n > MAX_CHOICES {
            return Err(invalid(
                "n",
                format!("Invalid 'n': {n}. Expected at most {MAX_CHOICES}."),
            ));
        }
        let user = match peek.user {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(u)) if u.trim().is_empty() => None,
            Some(serde_json::Value::String(u)) if u.len() <= MAX_USER_LEN => Some(u),
            Some(_) => {
                return Err(invalid(
                    "user",
                    format!("Invalid 'user': expected a string of at most {MAX_USER_LEN} bytes."),
                ));
            }
        };
        let include_usage = peek
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let temperature = match peek.temperature {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(t)) => t.as_f64(),
            Some(_) => {
                return Err(invalid(
                    "temperature",
                    "Invalid type for 'temperature': expected a number.",
                ));
            }
        };
        let prompt = peek
            .messages
            .map(|m| m.0)
            .or(peek.prompt.map(|p| p.0))
            .or(peek.input.map(|i| i.0))
            .unwrap_or_default();
        Ok(RequestFields {
            model,
            stream,
            max_tokens,
            max_tokens_param,
            n,
            user,
            include_usage,
            temperature,
            prompt,
        })
    }
}

/// The changes Carrel makes to a request body before forwarding it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite<'a> {
    /// Replace `model` with the provider's name for it.
    pub model: Option<&'a str>,
    /// Set this output cap (field, value): the quota policy clamped it.
    pub max_tokens: Option<(&'static str, u64)>,
    /// Ask the provider for a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Drop `user`: a patron's id never goes upstream.
    pub drop_user: bool,
}

impl Rewrite<'_> {
    /// Whether the body must change at all.
    pub fn is_needed(&self) -> bool {
        *self != Rewrite::default()
    }

    /// Applies the changes to a JSON object body, keeping every other field.
    pub fn apply(&self, body: &[u8]) -> Result<Bytes, GatewayError> {
        if let Some(spliced) = self.splice_usage(body) {
            return Ok(spliced);
        }
        let mut value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| GatewayError::MalformedJson(e.to_string()))?;
        if let Some(model) = self.model {
            value.insert(
                "model".to_owned(),
                serde_json::Value::String(model.to_owned()),
            );
        }
        if let Some((field, n)) = self.max_tokens {
            value.insert(field.to_owned(), serde_json::Value::from(n));
        }
        if self.include_usage {
            let options = value
                .entry("stream_options")
                .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            if !options.is_object() {
                *options = serde_json::Value::Object(serde_json::Map::new());
            }
            options["include_usage"] = serde_json::Value::Bool(true);
        }
        if self.drop_user {
            value.remove("user");
        }
        Ok(Bytes::from(
            serde_json::to_vec(&value).expect("a JSON map serialises"),
        ))
    }
}

impl Rewrite<'_> {
    /// Every stream is asked for its usage, and usually that is the only change: then the
    /// option is written in front of the client's fields, byte for byte as they came, instead
    /// of parsing and re-serialising the body. Only when the body cannot already name
    /// `stream_options` (the name does not occur, and no `\u` escape could spell it).
    fn splice_usage(&self, body: &[u8]) -> Option<Bytes> {
        const OPTION: &[u8] = br#""stream_options":{"include_usage":true}"#;
        let only_usage = Rewrite {
            include_usage: true,
            ..Rewrite::default()
        };
        if *self != only_usage
            || memchr::memmem::find(body, b"stream_options").is_some()
            || memchr::memmem::find(body, b"\\u").is_some()
        {
            return None;
        }
        let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body[open] != b'{' {
            return None;
        }
        let rest = &body[open + 1..];
        let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let mut out = Vec::with_capacity(body.len() + OPTION.len() + 1);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(OPTION);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        Some(Bytes::from(out))
    }
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

impl ErrorBody<'_> {
    /// The error as the data of a final SSE event (`data: {"error":…}` and a blank line): how a
    /// stream that has already begun ends with an error.
    pub fn sse_event(&self) -> Bytes {
        let json = serde_json::to_string(self).expect("the error body serialises");
        Bytes::from(format!("data: {json}\n\n"))
    }
}

impl GatewayError {
    fn wire(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: Cow::Owned(self.to_string()),
                kind: self.openai_type(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// The error as an OpenAI JSON body.
    pub fn body(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self.wire()).expect("the error body serialises"))
    }

    /// The error as a stream's final SSE event.
    pub fn sse_event(&self) -> Bytes {
        self.wire().sse_event()
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
    fn reads_the_fields_carrel_needs() {
        let f = RequestFields::parse(
            br#"{"messages":[{"role":"user","content":"hi \"there\""},{"role":"user","content":[{"type":"text","text":"and you"},{"type":"image_url","image_url":{"url":"x"}}]}],"model":"m","stream":true,"x":{"y":[1,2]},"max_tokens":50,"n":2,"user":"card-1","stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!((f.model.as_str(), f.stream), ("m", true));
        assert_eq!(
            (f.max_tokens, f.max_tokens_param, f.n),
            (Some(50), "max_tokens", 2)
        );
        assert_eq!((f.user.as_deref(), f.include_usage), (Some("card-1"), true));
        assert_eq!(f.prompt.text, "hi \"there\"\nand you");
        assert_eq!(f.prompt.messages, 2);
        let f = RequestFields::parse(
            br#"{"model":"caf\u00e9","max_completion_tokens":9,"max_tokens":5}"#,
        )
        .unwrap();
        assert_eq!(f.model, "café");
        assert!(!f.stream);
        assert_eq!(
            (f.max_tokens, f.max_tokens_param, f.n),
            (Some(9), "max_completion_tokens", 1)
        );
        let f = RequestFields::parse(br#"{"model":"e","input":[[1,2,3],[4]]}"#).unwrap();
        assert_eq!(f.prompt.token_ids, 4);
        let f = RequestFields::parse(br#"{"model":"c","prompt":["one","two"]}"#).unwrap();
        assert_eq!((f.prompt.text.as_str(), f.prompt.messages), ("one\ntwo", 0));
    }

    #[test]
    fn prompts_are_estimated_with_framing() {
        let f = RequestFields::parse(
            br#"{"model":"m","messages":[{"role":"user","content":"Hello, library!"}]}"#,
        )
        .unwrap();
        // 15 bytes → 4 tokens, + 4 for the message, + 3 to prime the reply.
        assert_eq!(f.prompt.estimate(Tokenizer::Bytes), 11);
    }

    #[test]
    fn rejects_what_it_cannot_route_or_count() {
        let err = |b: &[u8]| {
            let e = RequestFields::parse(b).unwrap_err();
            (e.code(), e.param())
        };
        assert_eq!(err(b"{nope").0, "invalid_json");
        assert_eq!(err(b"[1,2]").0, "invalid_json");
        assert_eq!(err(b"").0, "invalid_json");
        assert_eq!(
            err(br#"{"messages":[]}"#),
            ("invalid_parameter", Some("model"))
        );
        assert_eq!(err(br#"{"model":7}"#).0, "invalid_parameter");
        assert_eq!(
            err(br#"{"model":"m","stream":"yes"}"#),
            ("invalid_parameter", Some("stream"))
        );
        assert_eq!(err(br#"{"model":"m"} trailing"#).0, "invalid_json");
        for bad in [r#"-1"#, "0", "1.5", r#""10""#, "18446744073709551616"] {
            let body = format!(r#"{{"model":"m","max_tokens":{bad}}}"#);
            assert_eq!(
                err(body.as_bytes()),
                ("invalid_parameter", Some("max_tokens")),
                "{bad}"
            );
        }
        assert_eq!(
            err(br#"{"model":"m","n":0}"#),
            ("invalid_parameter", Some("n"))
        );
        assert_eq!(
            err(br#"{"model":"m","n":129}"#),
            ("invalid_parameter", Some("n"))
        );
        assert_eq!(
            err(br#"{"model":"m","user":7}"#),
            ("invalid_parameter", Some("user"))
        );
        let long = format!(r#"{{"model":"m","user":"{}"}}"#, "x".repeat(257));
        assert_eq!(err(long.as_bytes()), ("invalid_parameter", Some("user")));
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
            max_tokens in proptest::prelude::any::<Option<u32>>(),
        ) {
            let mut body = serde_json::json!({
                "messages": [{"role": "user", "content": content}],
                "model": model,
                "temperature": 0.2,
            });
            if let Some(stream) = stream {
                body["stream"] = serde_json::json!(stream);
            }
            let max_tokens = max_tokens.map(|m| u64::from(m) + 1);
            if let Some(m) = max_tokens {
                body["max_tokens"] = serde_json::json!(m);
            }
            let fields = RequestFields::parse(body.to_string().as_bytes()).unwrap();
            proptest::prop_assert_eq!(&fields.model, &model);
            proptest::prop_assert_eq!(fields.stream, stream.unwrap_or(false));
            proptest::prop_assert_eq!(fields.max_tokens, max_tokens);
            proptest::prop_assert_eq!(&fields.prompt.text, &content);
        }
    }

    #[test]
    fn a_rewrite_changes_only_what_it_says() {
        let body = br#"{"model":"public","temperature":0.5,"stream":true,"user":"card-1","stream_options":{"x":1}}"#;
        let out = Rewrite {
            model: Some("up"),
            max_tokens: Some(("max_tokens", 7)),
            include_usage: true,
            drop_user: true,
        }
        .apply(body)
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "up");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 7);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
        assert!(v.get("user").is_none());
        assert!(!Rewrite::default().is_needed());
    }

    /// The usual rewrite of a stream, spliced, means what the general rewrite means.
    #[test]
    fn asking_a_stream_for_its_usage_keeps_the_body_s_bytes() {
        let usage = Rewrite {
            include_usage: true,
            ..Rewrite::default()
        };
        let general = |body: &[u8]| -> serde_json::Value {
            let mut value: serde_json::Value = serde_json::from_slice(body).unwrap();
            value["stream_options"] = serde_json::json!({"include_usage": true});
            value
        };
        for body in [
            &br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#[..],
            br#"  { "model" : "m" , "stream" : true }  "#,
            br#"{}"#,
            br#" {  } "#,
            // Spliced or not, these must come out right too.
            br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#,
            br#"{"model":"m","stream\u005foptions":{"x":1},"stream":true}"#,
            br#"{"model":"m","messages":[{"role":"user","content":"caf\u00e9"}]}"#,
        ] {
            let out = usage.apply(body).unwrap();
            let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let mut want = general(body);
            if let Some(opts) = serde_json::from_slice::<serde_json::Value>(body)
                .unwrap()
                .get("stream_options")
            {
                want["stream_options"] = opts.clone();
                want["stream_options"]["include_usage"] = true.into();
            }
            assert_eq!(got, want, "{}", String::from_utf8_lossy(body));
        }
        // The common case keeps the client's bytes after the new field.
        let body = br#"{"model":"m","stream":true}"#;
        assert_eq!(
            &usage.apply(body).unwrap()[..],
            br#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
    }
}
