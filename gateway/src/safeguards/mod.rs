//! Safeguards on the data plane: containment switches ([`containment`]), checked in the
//! authorize stage and watched by streams in flight; screening of requests and answers with
//! the safeguard rules, and the incident register ([`screening`]).

pub mod containment;
pub mod screening;
