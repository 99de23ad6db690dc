//! Whatever a library's system sends, parsing it as a SIP2 reply never panics, under every
//! charset and with error detection on and off.

#![no_main]

use carrel_core::sip2::{Charset, Framing, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for charset in [Charset::Utf8, Charset::Iso8859_1, Charset::Ibm850] {
        for error_detection in [false, true] {
            let framing = Framing {
                terminator: b'\r',
                line_feed: false,
                error_detection,
                charset,
            };
            if let Ok(reply) = Reply::parse(data, &framing) {
                let _ = reply.login_ok();
                let _ = reply.patron_authenticated();
                let _ = reply.privileges_denied();
                let _ = reply.field(b"AA");
            }
        }
    }
});
