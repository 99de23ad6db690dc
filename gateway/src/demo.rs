//! The built-in demo model: in-process, free, deterministic, and plainly labelled as a demo.
//! It answers every prompt with the same explanation (plus the prompt's word count, so it is
//! visibly answering *this* request) and streams it word by word at a readable pace.
//! Prompts are read only to count words; nothing is kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};

use crate::body::{self, ResponseBody};
use crate::error::BoxError;
use crate::openai::RequestFields;
use crate::pipeline::Endpoint;

/// Public name of the demo model that `carrel demo` seeds.
pub const DEMO_MODEL: &str = "carrel-demo";

/// Pause between streamed words: about 25 words a second, a comfortable reading pace.
pub const DEFAULT_WORD_DELAY: Duration = Duration::from_millis(40);

/// Dimensions of demo embeddings.
const EMBEDDING_DIM: usize = 16;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn reply(prompt_words: usize) -> String {
    format!(
        "Hello from the Carrel demo model. I am not a real AI: I give this same answer to every \
         question, so you can see keys, streaming and the OpenAI API working before a real \
         provider is connected. Your message had {prompt_words} words."
    )
}

/// Counts whitespace-separated words in every string of the request's prompt fields.
fn prompt_words(body: &Value, endpoint: Endpoint) -> usize {
    fn words(v: &Value) -> usize {
        match v {
            Value::String(s) => s.split_whitespace().count(),
            Value::Array(items) => items.iter().map(words).sum(),
            Value::Object(map) => map
                .iter()
                .filter(|(k, _)| matches!(k.as_str(), "content" | "text"))
                .map(|(_, v)| words(v))
                .sum(),
            _ => 0,
        }
    }
    let field = match endpoint {
        Endpoint::ChatCompletions => "messages",
        Endpoint::Completions => "prompt",
        Endpoint::Embeddings => "input",
    };
    body.get(field).map(words).unwrap_or(0)
}

/// Answers a request as the demo model.
pub fn respond(
    endpoint: Endpoint,
    fields: &RequestFields,
    raw: &Bytes,
    word_delay: Duration,
) -> Response<ResponseBody> {
    // The body already parsed as a JSON object in stage 2.
    let request: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
    let prompt_tokens = prompt_words(&request, endpoint);
    let model = fields.model.as_str();
    let created = carrel_core::domain::unix_now();
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);

    if endpoint == Endpoint::Embeddings {
        return body::json(
            StatusCode::OK,
            embeddings(&request, model, prompt_tokens).to_string(),
        );
    }

    // Like a real model, stop at the output cap the (possibly clamped) request sets.
    let cap = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|f| request.get(*f).and_then(Value::as_u64))
        .and_then(|n| usize::try_from(n).ok());
    let full = reply(prompt_tokens);
    let words: Vec<&str> = full.split(' ').collect();
    let cut = cap.is_some_and(|cap| cap < words.len());
    let text = words[..cap.unwrap_or(words.len()).min(words.len())].join(" ");
    let finish = if cut { "length" } else { "stop" };
    let completion_tokens = text.split_whitespace().count();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let chat = endpoint == Endpoint::ChatCompletions;
    let id = format!("{}-demo-{n}", if chat { "chatcmpl" } else { "cmpl" });

    if !fields.stream {
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish, "logprobs": null})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        let answer = json!({"id": id, "object": object, "created": created, "model": model,
                            "choices": [choice], "usage": usage});
        return body::json(StatusCode::OK, answer.to_string());
    }

    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = |choice: Value| -> Bytes {
        let c = json!({"id": id, "object": object, "created": created, "model": model,
                       "choices": [choice]});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let delta = |content: &str, first: bool| {
        if chat {
            let delta = if first {
                json!({"role": "assistant", "content": content})
            } else {
                json!({"content": content})
            };
            json!({"index": 0, "delta": delta, "finish_reason": null})
        } else {
            json!({"index": 0, "text": content, "finish_reason": null})
        }
    };

    let mut events: Vec<(bool, Bytes)> = Vec::new();
    for (i, word) in text.split(' ').enumerate() {
        let piece = if i == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        events.push((i > 0, chunk(delta(&piece, i == 0))));
    }
    let stop = if chat {
        json!({"index": 0, "delta": {}, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": "", "finish_reason": finish})
    };
    events.push((false, chunk(stop)));
    if include_usage {
        let c = json!({"id": id, "object": object, "created": created, "model": model,
                       "choices": [], "usage": usage});
        events.push((false, Bytes::from(format!("data: {c}\n\n"))));
    }
    events.push((false, Bytes::from_static(b"data: [DONE]\n\n")));

    let frames = stream::unfold(events.into_iter(), move |mut rest| async move {
        let (paced, bytes) = rest.next()?;
        if paced {
            tokio::time::sleep(word_delay).await;
        }
        Some((Ok::<_, BoxError>(Frame::data(bytes)), rest))
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Deterministic unit vectors derived from each input's bytes.
fn embeddings(request: &Value, model: &str, prompt_tokens: usize) -> Value {
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::Array(items)) => items.iter().map(Value::to_string).collect(),
        Some(other) => vec![other.to_string()],
        None => vec![String::new()],
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            // FNV-1a seeds a xorshift generator: same input, same vector.
            let mut state = input.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            }) | 1;
            let raw: Vec<f64> = (0..EMBEDDING_DIM)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 2001) as f64 / 1000.0 - 1.0
                })
                .collect();
            let norm = raw
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
                .max(f64::EPSILON);
            let vector: Vec<f64> = raw.iter().map(|x| x / norm).collect();
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_prompt_words_in_messages_and_parts() {
        let body = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "three more words"}]}
        ]});
        assert_eq!(prompt_words(&body, Endpoint::ChatCompletions), 5);
        assert_eq!(
            prompt_words(&json!({"prompt": "a b"}), Endpoint::Completions),
            2
        );
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embeddings(&json!({"input": ["x", "y"]}), DEMO_MODEL, 2);
        let b = embeddings(&json!({"input": ["x", "y"]}), DEMO_MODEL, 2);
        assert_eq!(a, b);
        let v: Vec<f64> = serde_json::from_value(a["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(v.len(), EMBEDDING_DIM);
        assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-9);
        assert_ne!(a["data"][0], a["data"][1]);
    }
}
