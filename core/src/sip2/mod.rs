//! The SIP2 wire format (3M Standard Interchange Protocol 2.00), for signing patrons in
//! against a library's own system: messages, their error detection, and parsing the replies
//! Carrel needs. No I/O here; the client that speaks it over TCP builds on this.
//!
//! A message is a two-digit command, fixed-width fields, then variable fields `XXvalue|`, and a
//! terminator (`\r` unless configured). With error detection on, it ends with `AY<seq>AZ<sum>`
//! before the terminator: `<sum>` is four hex digits, the 16-bit two's complement of the byte
//! sum of everything before it, `AZ` included, so that the sum of the whole message and the
//! checksum is 0 modulo 2^16.
//!
//! Replies come from a system Carrel does not control: every parse is total (a malformed reply
//! is an [`Sip2Error`], never a panic), and nothing in a reply is logged by this module.

use std::fmt;

pub mod client;

/// What is wrong with a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Sip2Error {
    /// Too short for its command's fixed fields, or not a known reply.
    #[error("malformed SIP2 reply: {0}")]
    Malformed(&'static str),
    /// The checksum does not match the bytes.
    #[error("SIP2 reply checksum mismatch")]
    Checksum,
    /// A reply of another command than the one expected.
    #[error("unexpected SIP2 reply {found:?} (expected {expected:?})")]
    Unexpected {
        /// The command expected.
        expected: &'static str,
        /// The command received.
        found: String,
    },
    /// A field cannot be written in the configured character set.
    #[error("a SIP2 field cannot be written in {0}")]
    Unencodable(Charset),
    /// A field holds `|` or the terminator, which would end it early, or another control
    /// character (a line feed, a NUL…), which systems read as the end of a line or of the
    /// connection.
    #[error("a SIP2 field may not contain `|`, the message terminator or a control character")]
    Delimiter,
}

/// How text is written on the wire (a per-deployment setting of the library system).
///
/// In configuration: `"utf-8"`, `"iso-8859-1"` or `"ibm850"` (also accepted: `"UTF-8"`,
/// `"ISO-8859-1"`, `"IBM850"`, `"cp850"`, and the older `"utf8"` and `"iso8859-1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Charset {
    /// UTF-8.
    #[serde(rename = "utf-8", alias = "UTF-8", alias = "utf8")]
    Utf8,
    /// ISO-8859-1 (Latin-1).
    #[serde(rename = "iso-8859-1", alias = "ISO-8859-1", alias = "iso8859-1")]
    Iso8859_1,
    /// IBM850 (DOS code page 850, Western European), the default of many SIP2 systems.
    #[serde(rename = "ibm850", alias = "IBM850", alias = "cp850", alias = "CP850")]
    Ibm850,
}

impl fmt::Display for Charset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Charset::Utf8 => "UTF-8",
            Charset::Iso8859_1 => "ISO-8859-1",
            Charset::Ibm850 => "IBM850",
        })
    }
}

impl Charset {
    fn encode(self, text: &str, out: &mut Vec<u8>) -> Result<(), Sip2Error> {
        match self {
            Charset::Utf8 => out.extend_from_slice(text.as_bytes()),
            Charset::Iso8859_1 => {
                for c in text.chars() {
                    let b = u8::try_from(u32::from(c)).map_err(|_| Sip2Error::Unencodable(self))?;
                    out.push(b);
                }
            }
            Charset::Ibm850 => {
                let bytes =
                    oem_cp::encode_string_checked(text, &oem_cp::code_table::ENCODING_TABLE_CP850)
                        .ok_or(Sip2Error::Unencodable(self))?;
                out.extend_from_slice(&bytes);
            }
        }
        Ok(())
    }

    fn decode(self, bytes: &[u8]) -> String {
        match self {
            Charset::Utf8 => String::from_utf8_lossy(bytes).into_owned(),
            Charset::Iso8859_1 => bytes.iter().map(|&b| char::from(b)).collect(),
            // Every one of the 256 bytes is a character in code page 850.
            Charset::Ibm850 => oem_cp::decode_string_complete_table(
                bytes,
                &oem_cp::code_table::DECODING_TABLE_CP850,
            ),
        }
    }
}

/// How messages are framed: terminator, error detection, character set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// The byte that ends a message (`\r` by the standard).
    pub terminator: u8,
    /// Whether a `\n` follows the terminator on what Carrel sends (a `\r\n` terminator, for
    /// systems that want one). Replies are read either way.
    pub line_feed: bool,
    /// Whether messages carry `AY` sequence numbers and `AZ` checksums.
    pub error_detection: bool,
    /// The character set of text fields.
    pub charset: Charset,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            terminator: b'\r',
            line_feed: false,
            error_detection: true,
            charset: Charset::Utf8,
        }
    }
}

/// The checksum of `bytes`: four uppercase hex digits of the 16-bit two's complement of their
/// sum.
pub fn checksum(bytes: &[u8]) -> [u8; 4] {
    let sum = bytes
        .iter()
        .fold(0u16, |acc, &b| acc.wrapping_add(u16::from(b)));
    let value = sum.wrapping_neg();
    let hex = format!("{value:04X}");
    hex.as_bytes().try_into().expect("four hex digits")
}

/// A message to send: a command, its fixed fields, its variable fields.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    command: &'static str,
    fixed: String,
    fields: Vec<([u8; 2], String)>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Requests carry PINs and passwords: only the command is shown.
        f.debug_struct("Request")
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// `YYYYMMDD    HHMMSS`: the transaction date in local time, as SIP2 writes it.
pub fn transaction_date(local: jiff::civil::DateTime) -> String {
    local.strftime("%Y%m%d    %H%M%S").to_string()
}

impl Request {
    /// 93 Login: the terminal's account on the library system.
    pub fn login(user: &str, password: &str, location: &str) -> Request {
        Request {
            command: "93",
            fixed: "00".to_owned(),
            fields: vec![
                (*b"CN", user.to_owned()),
                (*b"CO", password.to_owned()),
                (*b"CP", location.to_owned()),
            ],
        }
    }

    /// 63 Patron Information, with no item lists: is this card valid, and its PIN right?
    pub fn patron_information(
        date: &str,
        institution: &str,
        card: &str,
        pin: &str,
        terminal_password: Option<&str>,
    ) -> Request {
        let mut fields = patron_fields(institution, card, terminal_password);
        fields.push((*b"AD", pin.to_owned()));
        Request {
            command: "63",
            // Language 000 (unknown), the date, and a summary asking for no item details.
            fixed: format!("000{date}          "),
            fields,
        }
    }

    /// 35 End Patron Session.
    pub fn end_session(
        date: &str,
        institution: &str,
        card: &str,
        terminal_password: Option<&str>,
    ) -> Request {
        Request {
            command: "35",
            fixed: date.to_owned(),
            fields: patron_fields(institution, card, terminal_password),
        }
    }

    /// 97 Request ACS Resend: the last reply arrived damaged. With error detection on it carries
    /// a checksum but no sequence number (`97AZFEF5`), as the standard has it.
    pub fn resend() -> Request {
        Request {
            command: "97",
            fixed: String::new(),
            fields: Vec::new(),
        }
    }

    /// The message on the wire, with sequence number `seq` (0–9) when error detection is on.
    pub fn encode(&self, framing: &Framing, seq: u8) -> Result<Vec<u8>, Sip2Error> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(self.command.as_bytes());
        framing.charset.encode(&self.fixed, &mut out)?;
        for (tag, value) in &self.fields {
            out.extend_from_slice(tag);
            // A `|` in a value would end the field early, and a control character (the
            // terminator, a line feed, a NUL) would end the message or upset the system reading
            // it: it cannot be sent.
            if value
                .chars()
                .any(|c| c == '|' || c == char::from(framing.terminator) || c.is_control())
            {
                return Err(Sip2Error::Delimiter);
            }
            framing.charset.encode(value, &mut out)?;
            out.push(b'|');
        }
        // 97 carries no sequence number: it asks for a resend of a damaged message, not a new
        // exchange.
        if framing.error_detection {
            if self.command != "97" {
                out.extend_from_slice(b"AY");
                out.push(b'0' + seq % 10);
            }
            out.extend_from_slice(b"AZ");
            let sum = checksum(&out);
            out.extend_from_slice(&sum);
        }
        out.push(framing.terminator);
        if framing.line_feed {
            out.push(b'\n');
        }
        Ok(out)
    }
}

/// The fields that name a patron to the library system: institution (`AO`), card (`AA`), and
/// the terminal password (`AC`) when one is configured.
fn patron_fields(
    institution: &str,
    card: &str,
    terminal_password: Option<&str>,
) -> Vec<([u8; 2], String)> {
    let mut fields = vec![(*b"AO", institution.to_owned()), (*b"AA", card.to_owned())];
    if let Some(tp) = terminal_password {
        fields.push((*b"AC", tp.to_owned()));
    }
    fields
}

/// A reply: its command, fixed part and variable fields, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    /// The two-digit command, such as `94` or `64`.
    pub command: String,
    fixed: Vec<u8>,
    fields: Vec<([u8; 2], Vec<u8>)>,
    charset: Charset,
    sequence: Option<u8>,
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Replies carry names and card numbers: only the command is shown.
        f.debug_struct("Reply")
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// The width of each reply's fixed fields after its command.
fn fixed_width(command: &str) -> Option<usize> {
    Some(match command {
        // ok.
        "94" => 1,
        // Patron status (14), language (3), date (18), then six counts of 4.
        "64" => 14 + 3 + 18 + 6 * 4,
        // Patron status, language, date.
        "24" => 14 + 3 + 18,
        // End session (Y/N), date.
        "36" => 1 + 18,
        // ACS status: six flags, timeout (3), retries (3), date (18), protocol version (4).
        "98" => 6 + 3 + 3 + 18 + 4,
        // SC resend: nothing.
        "96" => 0,
        _ => return None,
    })
}

impl Reply {
    /// Parses one reply (its terminator already removed, or not), checking its checksum when
    /// it has one, and when `framing` requires one, that it has.
    pub fn parse(bytes: &[u8], framing: &Framing) -> Result<Reply, Sip2Error> {
        let mut bytes = bytes;
        while let [rest @ .., last] = bytes
            && (*last == framing.terminator || *last == b'\n' || *last == b'\r')
        {
            bytes = rest;
        }
        let mut sequence = None;
        let body = match find_checksum(bytes) {
            Some((body_end, sum_at)) => {
                let expected = checksum(&bytes[..sum_at]);
                if !bytes[sum_at..].eq_ignore_ascii_case(&expected) {
                    return Err(Sip2Error::Checksum);
                }
                // `find_checksum` checked it is a digit.
                sequence = bytes.get(body_end + 2).map(|d| d.wrapping_sub(b'0'));
                &bytes[..body_end]
            }
            None if framing.error_detection && bytes.get(..2) != Some(b"96") => {
                return Err(Sip2Error::Malformed("no checksum"));
            }
            None => bytes,
        };
        let command = body
            .get(..2)
            .filter(|c| c.iter().all(u8::is_ascii_digit))
            .ok_or(Sip2Error::Malformed("no command"))?;
        let command = String::from_utf8_lossy(command).into_owned();
        let width = fixed_width(&command).ok_or(Sip2Error::Malformed("unknown command"))?;
        let fixed = body
            .get(2..2 + width)
            .ok_or(Sip2Error::Malformed("fixed fields cut short"))?;
        let mut fields = Vec::new();
        let mut rest = &body[2 + width..];
        while !rest.is_empty() {
            let end = rest.iter().position(|&b| b == b'|').unwrap_or(rest.len());
            let field = &rest[..end];
            rest = rest.get(end + 1..).unwrap_or_default();
            let [a, b, value @ ..] = field else {
                if field.is_empty() {
                    continue;
                }
                return Err(Sip2Error::Malformed("a field without its tag"));
            };
            fields.push(([*a, *b], value.to_vec()));
        }
        Ok(Reply {
            command,
            fixed: fixed.to_vec(),
            fields,
            charset: framing.charset,
            sequence,
        })
    }

    /// The sequence number (`AY`) the reply carried, when it had error detection's fields: the
    /// number of the request it answers.
    pub fn sequence(&self) -> Option<u8> {
        self.sequence
    }

    /// Fails unless this is a reply to `command`.
    pub fn expect(self, command: &'static str) -> Result<Reply, Sip2Error> {
        if self.command == command {
            Ok(self)
        } else {
            Err(Sip2Error::Unexpected {
                expected: command,
                found: self.command,
            })
        }
    }

    /// The first value of variable field `tag`, decoded.
    pub fn field(&self, tag: &[u8; 2]) -> Option<String> {
        self.fields
            .iter()
            .find(|(t, _)| t == tag)
            .map(|(_, v)| self.charset.decode(v))
    }

    /// Whether a field is exactly `Y`.
    fn flag(&self, tag: &[u8; 2]) -> bool {
        self.fields
            .iter()
            .find(|(t, _)| t == tag)
            .is_some_and(|(_, v)| v.as_slice() == b"Y")
    }

    /// 94: whether the login worked.
    pub fn login_ok(&self) -> bool {
        self.command == "94" && self.fixed.first() == Some(&b'1')
    }

    /// 64 or 24: the card is a valid patron (`BL`) and the PIN is right (`CQ`). Both are needed:
    /// systems answer `BL=Y` for a known card whatever the PIN.
    pub fn patron_authenticated(&self) -> bool {
        matches!(self.command.as_str(), "64" | "24") && self.flag(b"BL") && self.flag(b"CQ")
    }

    /// 64 or 24: the card is known (`BL=Y`), whatever the PIN.
    pub fn patron_valid(&self) -> bool {
        matches!(self.command.as_str(), "64" | "24") && self.flag(b"BL")
    }

    /// 64 or 24: the 14 patron status flags, a `Y` where a privilege is denied (charge, renew,
    /// recall, hold, card reported lost, …).
    pub fn privileges_denied(&self) -> Option<&[u8]> {
        matches!(self.command.as_str(), "64" | "24").then(|| &self.fixed[..14])
    }
}

/// Where a trailing `AY<d>AZ<4 hex>` begins: (end of the message body, start of the checksum).
fn find_checksum(bytes: &[u8]) -> Option<(usize, usize)> {
    let n = bytes.len();
    if n < 9 {
        return None;
    }
    let tail = &bytes[n - 9..];
    let ok = &tail[..2] == b"AY"
        && tail[2].is_ascii_digit()
        && &tail[3..5] == b"AZ"
        && tail[5..].iter().all(u8::is_ascii_hexdigit);
    ok.then_some((n - 9, n - 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_feed_follows_the_terminator_when_asked() {
        let cr = Request::resend().encode(&Framing::default(), 0).unwrap();
        assert!(cr.ends_with(b"\r") && !cr.ends_with(b"\r\n"));
        let crlf = Framing {
            line_feed: true,
            ..Framing::default()
        };
        let login = Request::login("u", "p", "l").encode(&crlf, 0).unwrap();
        assert!(login.ends_with(b"\r\n"), "{login:?}");
        // The checksum covers the message, not the line end.
        let plain = Request::login("u", "p", "l")
            .encode(&Framing::default(), 0)
            .unwrap();
        assert_eq!(&login[..login.len() - 1], &plain[..]);
    }

    /// The fuzz target's committed seeds (`fuzz/corpus/sip2_reply`) parse without a panic
    /// under every framing, on stable, in CI; `cargo fuzz` explores from them.
    #[test]
    fn the_fuzz_seed_corpus_parses_without_panicking() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/sip2_reply");
        let mut seeds = 0;
        for entry in std::fs::read_dir(dir).expect("the seed corpus is committed") {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for charset in [Charset::Utf8, Charset::Iso8859_1, Charset::Ibm850] {
                for error_detection in [false, true] {
                    let framing = Framing {
                        terminator: b'\r',
                        line_feed: false,
                        error_detection,
                        charset,
                    };
                    if let Ok(reply) = Reply::parse(&bytes, &framing) {
                        let _ = (reply.login_ok(), reply.patron_authenticated());
                    }
                }
            }
            seeds += 1;
        }
        assert!(seeds >= 5, "{seeds} seeds");
    }
    use proptest::prelude::*;

    #[test]
    fn the_checksum_of_the_developer_guide_example() {
        // 3M SIP2 Developer's Guide, p. 26.
        assert_eq!(&checksum(b"990 402.00AY1AZ"), b"FCB4");
    }

    #[test]
    fn a_login_is_written_field_by_field_and_checks_out() {
        let framing = Framing::default();
        let wire = Request::login("kiosk", "s3cret", "MAIN")
            .encode(&framing, 0)
            .unwrap();
        let text = std::str::from_utf8(&wire).unwrap();
        assert!(
            text.starts_with("9300CNkiosk|COs3cret|CPMAIN|AY0AZ"),
            "{text}"
        );
        assert!(text.ends_with('\r'));
        // The bytes and their checksum sum to zero.
        let body = &wire[..wire.len() - 5];
        let sum: u16 = body.iter().fold(0, |a, &b| a.wrapping_add(u16::from(b)));
        let check = u16::from_str_radix(
            std::str::from_utf8(&wire[wire.len() - 5..wire.len() - 1]).unwrap(),
            16,
        )
        .unwrap();
        assert_eq!(sum.wrapping_add(check), 0);
    }

    fn reply(text: &str) -> Vec<u8> {
        let mut bytes = text.as_bytes().to_vec();
        bytes.extend_from_slice(b"AY1AZ");
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        bytes.push(b'\r');
        bytes
    }

    const DATE: &str = "20261127    101500";

    #[test]
    fn dates_are_written_as_sip2_writes_them() {
        let local: jiff::civil::DateTime = "2026-11-27T10:15:00".parse().unwrap();
        assert_eq!(transaction_date(local), DATE);
    }

    fn patron_info(bl: &str, cq: &str) -> Vec<u8> {
        reply(&format!(
            "64              000{DATE}000000000000000000000000AOMAIN|AA2900012345|AEAna Example|BL{bl}|CQ{cq}|"
        ))
    }

    #[test]
    fn a_patron_is_signed_in_only_with_a_valid_card_and_the_right_pin() {
        let framing = Framing::default();
        let ok = Reply::parse(&patron_info("Y", "Y"), &framing).unwrap();
        assert!(ok.patron_authenticated());
        assert_eq!(ok.field(b"AE").as_deref(), Some("Ana Example"));
        let wrong_pin = Reply::parse(&patron_info("Y", "N"), &framing).unwrap();
        assert!(wrong_pin.patron_valid() && !wrong_pin.patron_authenticated());
        let unknown = Reply::parse(&patron_info("N", "N"), &framing).unwrap();
        assert!(!unknown.patron_valid());
        // Debug output never shows a card or a name.
        let shown = format!("{ok:?}");
        assert!(
            !shown.contains("2900012345") && !shown.contains("Ana"),
            "{shown}"
        );
    }

    #[test]
    fn a_damaged_reply_is_a_checksum_error_and_a_short_one_malformed() {
        let framing = Framing::default();
        let mut bad = patron_info("Y", "Y");
        bad[20] ^= 0x01;
        assert_eq!(Reply::parse(&bad, &framing), Err(Sip2Error::Checksum));
        assert_eq!(
            Reply::parse(&reply("64  "), &framing),
            Err(Sip2Error::Malformed("fixed fields cut short"))
        );
        assert_eq!(
            Reply::parse(b"941\r", &framing),
            Err(Sip2Error::Malformed("no checksum"))
        );
        let plain = Framing {
            error_detection: false,
            ..Framing::default()
        };
        assert!(Reply::parse(b"941\r", &plain).unwrap().login_ok());
        assert!(!Reply::parse(b"940\r", &plain).unwrap().login_ok());
        let late = Reply::parse(&reply("941"), &framing).unwrap();
        assert!(matches!(
            late.expect("64"),
            Err(Sip2Error::Unexpected { .. })
        ));
    }

    #[test]
    fn latin1_is_written_and_read_as_latin1() {
        let framing = Framing {
            charset: Charset::Iso8859_1,
            ..Framing::default()
        };
        let wire = Request::patron_information(DATE, "MAIN", "123", "pín", None)
            .encode(&framing, 3)
            .unwrap();
        assert!(wire.windows(5).any(|w| w == b"ADp\xedn"));
        let reply_bytes = {
            let mut b = b"64              000".to_vec();
            b.extend_from_slice(DATE.as_bytes());
            b.extend_from_slice(b"000000000000000000000000AEJos\xe9|BLY|CQY|");
            b.push(b'\r');
            b
        };
        let plain = Framing {
            error_detection: false,
            ..framing
        };
        let r = Reply::parse(&reply_bytes, &plain).unwrap();
        assert_eq!(r.field(b"AE").as_deref(), Some("José"));
        assert_eq!(
            Request::login("ünï", "ok", "x")
                .encode(&framing, 0)
                .map(drop),
            Ok(())
        );
        assert_eq!(
            Request::login("日本", "ok", "x").encode(&framing, 0),
            Err(Sip2Error::Unencodable(Charset::Iso8859_1))
        );
    }

    #[test]
    fn a_pipe_in_a_field_is_refused_rather_than_sent() {
        let framing = Framing::default();
        assert_eq!(
            Request::patron_information(DATE, "MAIN", "12|AD0000", "x", None).encode(&framing, 0),
            Err(Sip2Error::Delimiter)
        );
    }

    #[test]
    fn ibm850_is_written_and_read_as_code_page_850() {
        let framing = Framing {
            charset: Charset::Ibm850,
            ..Framing::default()
        };
        let wire = Request::patron_information(DATE, "MAIN", "123", "éñ", None)
            .encode(&framing, 3)
            .unwrap();
        assert!(wire.windows(4).any(|w| w == b"AD\x82\xa4"), "{wire:?}");
        let reply_bytes = {
            let mut b = b"64              000".to_vec();
            b.extend_from_slice(DATE.as_bytes());
            b.extend_from_slice(b"000000000000000000000000AEJos\x82 Mu\xa4oz|BLY|CQY|");
            b.push(b'\r');
            b
        };
        let plain = Framing {
            error_detection: false,
            ..framing
        };
        let r = Reply::parse(&reply_bytes, &plain).unwrap();
        assert_eq!(r.field(b"AE").as_deref(), Some("José Muñoz"));
        // Latin-1 has no euro sign; neither has code page 850 (858 has).
        assert_eq!(
            Request::login("€", "ok", "x").encode(&framing, 0),
            Err(Sip2Error::Unencodable(Charset::Ibm850))
        );
        assert_eq!(
            Request::login("日本", "ok", "x").encode(&framing, 0),
            Err(Sip2Error::Unencodable(Charset::Ibm850))
        );
        assert_eq!(Charset::Ibm850.to_string(), "IBM850");
        assert_eq!(
            Sip2Error::Unencodable(Charset::Ibm850).to_string(),
            "a SIP2 field cannot be written in IBM850"
        );
    }

    #[test]
    fn charsets_have_their_usual_names_in_configuration() {
        for (charset, name) in [
            (Charset::Utf8, "utf-8"),
            (Charset::Iso8859_1, "iso-8859-1"),
            (Charset::Ibm850, "ibm850"),
        ] {
            assert_eq!(
                serde_json::to_string(&charset).unwrap(),
                format!("\"{name}\"")
            );
            let back: Charset = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(back, charset);
        }
        for (alias, charset) in [
            ("UTF-8", Charset::Utf8),
            ("utf8", Charset::Utf8),
            ("ISO-8859-1", Charset::Iso8859_1),
            ("iso8859-1", Charset::Iso8859_1),
            ("IBM850", Charset::Ibm850),
            ("cp850", Charset::Ibm850),
        ] {
            let parsed: Charset = serde_json::from_str(&format!("\"{alias}\"")).unwrap();
            assert_eq!(parsed, charset, "{alias}");
        }
        assert!(serde_json::from_str::<Charset>("\"ebcdic\"").is_err());
    }

    #[test]
    fn a_resend_request_has_a_checksum_but_no_sequence_number() {
        let framing = Framing::default();
        assert_eq!(
            Request::resend().encode(&framing, 7).unwrap(),
            b"97AZFEF5\r"
        );
        let plain = Framing {
            error_detection: false,
            ..framing
        };
        assert_eq!(Request::resend().encode(&plain, 7).unwrap(), b"97\r");
    }

    #[test]
    fn control_characters_in_a_field_are_refused() {
        let framing = Framing::default();
        for card in ["12\r34", "12\n34", "12\u{0}34", "12\u{7f}"] {
            assert_eq!(
                Request::patron_information(DATE, "MAIN", card, "x", None).encode(&framing, 0),
                Err(Sip2Error::Delimiter),
                "{card:?}"
            );
        }
    }

    #[test]
    fn a_reply_tells_which_request_it_answers() {
        let framing = Framing::default();
        let r = Reply::parse(&patron_info("Y", "Y"), &framing).unwrap();
        assert_eq!(r.sequence(), Some(1));
        let plain = Framing {
            error_detection: false,
            ..framing
        };
        assert_eq!(Reply::parse(b"941\r", &plain).unwrap().sequence(), None);
    }

    fn any_charset() -> impl Strategy<Value = Charset> {
        prop_oneof![
            Just(Charset::Utf8),
            Just(Charset::Iso8859_1),
            Just(Charset::Ibm850)
        ]
    }

    proptest! {
        /// Whatever arrives, parsing answers: a reply or an error, never a panic.
        #[test]
        fn parsing_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                          detect in any::<bool>(),
                                          charset in any_charset()) {
            let framing = Framing { error_detection: detect, charset, ..Framing::default() };
            if let Ok(reply) = Reply::parse(&bytes, &framing) {
                let _ = reply.field(b"AE");
                let _ = reply.privileges_denied();
            }
        }

        /// In the single-byte charsets every byte is a character, and it is written back as the
        /// same byte.
        #[test]
        fn single_byte_charsets_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..100),
                                           charset in prop_oneof![Just(Charset::Iso8859_1), Just(Charset::Ibm850)]) {
            let text = charset.decode(&bytes);
            let mut back = Vec::new();
            charset.encode(&text, &mut back).unwrap();
            prop_assert_eq!(back, bytes);
        }

        /// What can be written can be read back, in every charset.
        #[test]
        fn written_text_reads_back(text in "[a-zA-Z0-9 éñüÉÑÜçøß¿]{0,40}", charset in any_charset()) {
            let mut bytes = Vec::new();
            charset.encode(&text, &mut bytes).unwrap();
            prop_assert_eq!(charset.decode(&bytes), text);
        }

        /// A reply with a valid checksum parses; with any one byte before its checksum digits
        /// changed, it does not pass as the same reply.
        #[test]
        fn one_changed_byte_is_caught(at in 0usize..200, flip in 1u8..=255) {
            let good = patron_info("Y", "Y");
            let mut bad = good.clone();
            let at = at % (good.len() - 5);
            bad[at] ^= flip;
            let framing = Framing::default();
            let parsed = Reply::parse(&bad, &framing);
            prop_assert!(parsed != Reply::parse(&good, &framing));
        }
    }
}
