//! Safeguards on the data plane: containment switches ([`containment`]), checked in the
//! authorize stage and watched by streams in flight.

pub mod containment;
