//! Token counts Carrel estimates itself: a request's prompt before it is forwarded (to reserve
//! quota), and a stream's output when the provider reports no usage.
//!
//! OpenAI-family models are counted with their own tokenizer (tiktoken-rs, whose vocabularies
//! are compiled into the binary: nothing is downloaded). Other models use the rule of thumb
//! OpenAI documents for English: **one token per four bytes of UTF-8, rounded up** for a prompt,
//! and **one token per word (at least one per chunk)** for streamed output. Either way a
//! chat prompt counts each message's text plus 4 tokens of framing, plus 3 that prime the
//! reply, as OpenAI's cookbook counts them. Images, audio and tool definitions are not counted;
//! settlement corrects the estimate to what the provider reports.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// How a model's text is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    /// OpenAI's `o200k_base` (GPT-4o, GPT-4.1, GPT-5, o-series).
    O200k,
    /// OpenAI's `cl100k_base` (GPT-4, GPT-3.5, text-embedding-3).
    Cl100k,
    /// Four bytes a token.
    Bytes,
}

/// Framing tokens of one chat message.
pub const PER_MESSAGE: u64 = 4;
/// Tokens that prime the assistant's reply.
pub const REPLY_PRIMING: u64 = 3;

static O200K: OnceLock<CoreBPE> = OnceLock::new();
static CL100K: OnceLock<CoreBPE> = OnceLock::new();

impl Tokenizer {
    /// The tokenizer of a provider's model name.
    pub fn for_model(upstream_model: &str) -> Tokenizer {
        match tiktoken_rs::tokenizer::get_tokenizer(upstream_model) {
            Some(tiktoken_rs::tokenizer::Tokenizer::O200kBase)
            | Some(tiktoken_rs::tokenizer::Tokenizer::O200kHarmony) => Tokenizer::O200k,
            Some(tiktoken_rs::tokenizer::Tokenizer::Cl100kBase) => Tokenizer::Cl100k,
            _ => Tokenizer::Bytes,
        }
    }

    fn bpe(self) -> Option<&'static CoreBPE> {
        match self {
            Tokenizer::O200k => Some(
                O200K.get_or_init(|| tiktoken_rs::o200k_base().expect("o200k_base is bundled")),
            ),
            Tokenizer::Cl100k => Some(
                CL100K.get_or_init(|| tiktoken_rs::cl100k_base().expect("cl100k_base is bundled")),
            ),
            Tokenizer::Bytes => None,
        }
    }

    /// Loads the vocabulary now (a few hundred milliseconds), so the first request does not.
    pub fn warm(self) {
        let _ = self.bpe();
    }

    /// Tokens in one streamed piece of output (a chunk's `delta.content`). Providers stream
    /// about a token a chunk, so a piece counts at least one; without the model's tokenizer a
    /// piece counts one per word (four bytes a token would count `" word"` as two, and cut
    /// streams at half their allowance).
    pub fn count_piece(self, piece: &str) -> u64 {
        match self {
            Tokenizer::Bytes => (piece.split_whitespace().count() as u64).max(1),
            _ => self.count(piece).max(1),
        }
    }

    /// Tokens in `text`.
    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        match self.bpe() {
            Some(bpe) => bpe.encode_ordinary(text).len() as u64,
            None => (text.len() as u64).div_ceil(4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_get_their_tokenizer() {
        assert_eq!(Tokenizer::for_model("gpt-4o-mini"), Tokenizer::O200k);
        assert_eq!(Tokenizer::for_model("gpt-4"), Tokenizer::Cl100k);
        assert_eq!(Tokenizer::for_model("llama3.1:8b"), Tokenizer::Bytes);
    }

    #[test]
    fn streamed_pieces_count_at_least_one() {
        assert_eq!(Tokenizer::Bytes.count_piece(" word"), 1);
        assert_eq!(Tokenizer::Bytes.count_piece(" explanation"), 1);
        assert_eq!(Tokenizer::Bytes.count_piece("Hello from the"), 3);
        assert_eq!(Tokenizer::Bytes.count_piece(""), 1);
        assert_eq!(Tokenizer::O200k.count_piece(" the"), 1);
    }

    #[test]
    fn counts() {
        assert_eq!(Tokenizer::Bytes.count("Hello, library!"), 4);
        assert_eq!(Tokenizer::Bytes.count(""), 0);
        assert_eq!(Tokenizer::O200k.count(" hello hello hello"), 3);
        assert_eq!(Tokenizer::Cl100k.count("Hello world"), 2);
    }
}
