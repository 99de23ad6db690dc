#!/usr/bin/env python3
"""Check a signed Carrel response, independently of Carrel's own code.

Carrel signs every response with HTTP Message Signatures (RFC 9421) using Ed25519, over an
RFC 9530 Content-Digest of the body. This script rebuilds the signature base itself, following
RFC 9421 section 2.5 and the Structured Field rules of RFC 8941, and checks the signature with
the `cryptography` package against a JSON Web Key Set (the gateway serves its own at
/.well-known/carrel/keys).

Usage:
    verify_signature.py --jwks jwks.json --response response.json [--stream] [--show-base]

response.json is {"status": 200, "headers": {"name": "value", ...}, "body_b64": "..."}: the body
as received, in standard base64. With --stream the body is a server-sent event stream whose last
event is

    event: carrel.signature
    data: {"content_digest": "...", "signature_input": "...", "signature": "..."}

and the digest covers every byte of the body before that event.

Exit status: 0 and "ok kid=<kid>" on stdout when the response verifies; 1 and the reason on
stderr when it does not; 2 when the input files cannot be read.
"""

import argparse
import base64
import binascii
import hashlib
import json
import re
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# What Carrel signs (its contract), checked as policy on top of the generic RFC 9421 rules.
LABEL = "carrel"
REQUIRED_COMPONENTS = ["@status", "content-digest", "x-request-id", "carrel-model", "date"]
ALLOWED_PARAMS = {"created", "keyid", "alg"}
SSE_EVENT = b"event: carrel.signature"


class Failure(Exception):
    """The response does not verify; the message says why."""


# --------------------------------------------------------------------------------------------
# RFC 8941 Structured Field Values: parsing (section 4.2) and serialization (section 4.1).
# Strings are str, tokens Token, byte sequences bytes, booleans bool, integers int, decimals
# float. An item or inner list is (value, params) where params is a list of (key, value).
# --------------------------------------------------------------------------------------------


class Token(str):
    """An sf-token (kept apart from sf-string for serialization)."""


class InnerList(list):
    """An sf inner list: a list of (bare item, params)."""


KEY_FIRST = set("abcdefghijklmnopqrstuvwxyz*")
KEY_REST = KEY_FIRST | set("0123456789_-.")
TCHAR = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
DIGITS = set("0123456789")
B64_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class SFParser:
    def __init__(self, text):
        self.s = text
        self.i = 0

    def fail(self, what):
        raise ValueError(f"{what} at offset {self.i} of {self.s!r}")

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else ""

    def discard_sp(self):
        while self.peek() == " ":
            self.i += 1

    def discard_ows(self):
        while self.peek() in (" ", "\t") and self.peek():
            self.i += 1

    def parse_dictionary_field(self):
        """Section 4.2 with 4.2.2. Duplicate keys are refused (the RFC keeps the last; for a
        signature, two members of one label would be ambiguous)."""
        self.discard_sp()
        members = []
        seen = set()
        while self.i < len(self.s):
            key = self.parse_key()
            if self.peek() == "=":
                self.i += 1
                member = self.parse_item_or_inner_list()
            else:
                member = (True, self.parse_parameters())
            if key in seen:
                raise ValueError(f"dictionary key {key!r} appears more than once")
            seen.add(key)
            members.append((key, member))
            self.discard_ows()
            if self.i >= len(self.s):
                break
            if self.peek() != ",":
                self.fail("expected ','")
            self.i += 1
            self.discard_ows()
            if self.i >= len(self.s):
                self.fail("trailing ','")
        self.discard_sp()
        if self.i != len(self.s):
            self.fail("unexpected text")
        return dict(members)

    def parse_item_or_inner_list(self):
        if self.peek() == "(":
            return self.parse_inner_list()
        return self.parse_item()

    def parse_inner_list(self):
        self.i += 1  # "("
        items = InnerList()
        while self.i < len(self.s):
            self.discard_sp()
            if self.peek() == ")":
                self.i += 1
                return (items, self.parse_parameters())
            items.append(self.parse_item())
            if self.peek() not in (" ", ")"):
                self.fail("expected ' ' or ')' in inner list")
        self.fail("inner list not closed")

    def parse_item(self):
        value = self.parse_bare_item()
        return (value, self.parse_parameters())

    def parse_parameters(self):
        params = []
        while self.peek() == ";":
            self.i += 1
            self.discard_sp()
            key = self.parse_key()
            value = True
            if self.peek() == "=":
                self.i += 1
                value = self.parse_bare_item()
            params = [(k, v) for (k, v) in params if k != key] + [(key, value)]
        return params

    def parse_key(self):
        if self.peek() not in KEY_FIRST or not self.peek():
            self.fail("expected a key")
        start = self.i
        while self.peek() and self.peek() in KEY_REST:
            self.i += 1
        return self.s[start:self.i]

    def parse_bare_item(self):
        c = self.peek()
        if c == "-" or c in DIGITS:
            return self.parse_number()
        if c == '"':
            return self.parse_string()
        if c == "*" or (c.isascii() and c.isalpha()):
            return self.parse_token()
        if c == ":":
            return self.parse_byte_sequence()
        if c == "?":
            return self.parse_boolean()
        self.fail("expected an item")

    def parse_number(self):
        m = re.compile(r"-?[0-9]+(\.[0-9]+)?").match(self.s, self.i)
        if not m:
            self.fail("bad number")
        text = m.group(0)
        self.i = m.end()
        if m.group(1) is None:
            if len(text.lstrip("-")) > 15:
                self.fail("integer too long")
            return int(text)
        whole, frac = text.lstrip("-").split(".")
        if len(whole) > 12 or len(frac) > 3:
            self.fail("bad decimal")
        return float(text)

    def parse_string(self):
        self.i += 1
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            self.i += 1
            if c == "\\":
                if self.i >= len(self.s) or self.s[self.i] not in ('"', "\\"):
                    self.fail("bad escape in string")
                out.append(self.s[self.i])
                self.i += 1
            elif c == '"':
                return "".join(out)
            elif not (0x20 <= ord(c) <= 0x7E):
                self.fail("non-printable character in string")
            else:
                out.append(c)
        self.fail("string not closed")

    def parse_token(self):
        start = self.i
        self.i += 1
        while self.peek() and (self.peek() in TCHAR or self.peek() in ":/"):
            self.i += 1
        return Token(self.s[start:self.i])

    def parse_byte_sequence(self):
        end = self.s.find(":", self.i + 1)
        if end < 0:
            self.fail("byte sequence not closed")
        b64 = self.s[self.i + 1:end]
        if any(ch not in B64_CHARS for ch in b64):
            self.fail("bad base64 in byte sequence")
        self.i = end + 1
        try:
            return base64.b64decode(b64, validate=True)
        except binascii.Error:
            self.fail("bad base64 in byte sequence")

    def parse_boolean(self):
        if self.s[self.i:self.i + 2] == "?1":
            self.i += 2
            return True
        if self.s[self.i:self.i + 2] == "?0":
            self.i += 2
            return False
        self.fail("bad boolean")


def sf_bare_item(value):
    """RFC 8941 section 4.1.3.1."""
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if isinstance(value, Token):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode() + ":"
    raise ValueError(f"cannot serialize {value!r}")


def sf_params(params):
    """RFC 8941 section 4.1.1.2."""
    out = ""
    for key, value in params:
        out += ";" + key
        if value is not True:
            out += "=" + sf_bare_item(value)
    return out


def sf_inner_list(items, params):
    """RFC 8941 section 4.1.1.1."""
    return "(" + " ".join(sf_bare_item(v) + sf_params(p) for v, p in items) + ")" + sf_params(params)


def parse_dictionary(text, field):
    try:
        return SFParser(text).parse_dictionary_field()
    except ValueError as e:
        raise Failure(f"the {field} is not a valid structured field dictionary: {e}") from None


# --------------------------------------------------------------------------------------------
# RFC 9421 signature base (section 2.5) and verification (section 3.2).
# --------------------------------------------------------------------------------------------


def field_value(headers, name):
    """Section 2.1: the field's value, trimmed of leading and trailing whitespace (several
    field lines would be joined with ", "; the saved response has one value per name)."""
    if name not in headers:
        raise Failure(f"the response has no {name} header, which the signature covers")
    value = headers[name].strip(" \t")
    if any(ord(c) < 0x20 and c != "\t" or ord(c) > 0x7E for c in value):
        raise Failure(f"the {name} header holds characters a signature base cannot carry")
    return value


def signature_base(components, params, status, headers):
    lines = []
    seen = set()
    for name, component_params in components:
        if not isinstance(name, str) or isinstance(name, Token):
            raise Failure("a covered component identifier is not a string")
        if component_params:
            raise Failure(f"component {name!r} has parameters; this verifier does not support them")
        if name in seen:
            raise Failure(f"component {name!r} is covered twice")
        seen.add(name)
        if name == "@status":
            if not 100 <= status <= 999:
                raise Failure(f"status {status} is not a three-digit code")
            value = str(status)
        elif name.startswith("@"):
            raise Failure(f"derived component {name!r} does not apply to a response")
        else:
            if name != name.lower():
                raise Failure(f"component {name!r} is not lower case")
            value = field_value(headers, name)
        lines.append(f'{sf_bare_item(name)}: {value}')
    lines.append('"@signature-params": ' + sf_inner_list(components, params))
    return "\n".join(lines)


def find_key(jwks, kid):
    for jwk in jwks.get("keys", []):
        if jwk.get("kid") == kid:
            if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
                raise Failure(f"the key set entry for kid {kid!r} is not an Ed25519 key")
            if jwk.get("alg", "EdDSA") != "EdDSA" or jwk.get("use", "sig") != "sig":
                raise Failure(f"the key set entry for kid {kid!r} is not an EdDSA signing key")
            x = jwk.get("x", "")
            try:
                raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            except (binascii.Error, ValueError):
                raise Failure(f"the key set entry for kid {kid!r} has a bad x") from None
            if len(raw) != 32:
                raise Failure(f"the key set entry for kid {kid!r} is not 32 bytes")
            return Ed25519PublicKey.from_public_bytes(raw)
    raise Failure(f"no key with kid {kid!r} in the key set")


def verify_signature(jwks, status, headers, signature_input, signature, show_base):
    inputs = parse_dictionary(signature_input, "Signature-Input")
    signatures = parse_dictionary(signature, "Signature")
    if LABEL not in inputs or LABEL not in signatures:
        raise Failure(f"no {LABEL!r} signature (labels found: {sorted(inputs)})")

    components, params = inputs[LABEL]
    if not isinstance(components, InnerList):
        raise Failure("the carrel Signature-Input member is not an inner list")
    names = [c for c, _ in components]
    if names != REQUIRED_COMPONENTS:
        raise Failure(f"the signature covers {names}, not Carrel's {REQUIRED_COMPONENTS}")
    param_map = dict(params)
    unknown = set(param_map) - ALLOWED_PARAMS
    if unknown:
        raise Failure(f"unexpected signature parameters {sorted(unknown)}")
    if param_map.get("alg") != "ed25519":
        raise Failure(f"alg is {param_map.get('alg')!r}, not 'ed25519'")
    created = param_map.get("created")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise Failure("the created parameter is missing or not a Unix time")
    kid = param_map.get("keyid")
    if not isinstance(kid, str) or isinstance(kid, Token):
        raise Failure("the keyid parameter is missing or not a string")

    sig_value, sig_params = signatures[LABEL]
    if not isinstance(sig_value, bytes) or sig_params:
        raise Failure("the carrel Signature member is not a plain byte sequence")
    if len(sig_value) != 64:
        raise Failure(f"the signature is {len(sig_value)} bytes, an Ed25519 one is 64")

    key = find_key(jwks, kid)
    base = signature_base(components, params, status, headers)
    if show_base:
        print(base, file=sys.stderr)
    try:
        key.verify(sig_value, base.encode("ascii"))
    except InvalidSignature:
        raise Failure(
            f"bad signature for kid {kid!r}: the status or a covered header differs from what was signed"
        ) from None
    return kid


def check_content_digest(value, content):
    """RFC 9530 section 2: the sha-256 member must equal SHA-256 of the content."""
    digests = parse_dictionary(value, "Content-Digest")
    if "sha-256" not in digests:
        raise Failure(f"Content-Digest has no sha-256 member ({sorted(digests)})")
    signed, _ = digests["sha-256"]
    if not isinstance(signed, bytes):
        raise Failure("the sha-256 Content-Digest member is not a byte sequence")
    if signed != hashlib.sha256(content).digest():
        raise Failure("the body does not match its Content-Digest: it was changed after signing")


def split_stream(body):
    """Separates the final carrel.signature event from the streamed content before it."""
    if not body.endswith(b"\n\n"):
        raise Failure("the stream does not end with a complete event")
    # The last "event: carrel.signature" line that starts a line (after LF, CR or at the start).
    marker = SSE_EVENT + b"\n"
    start = body.rfind(marker)
    while start > 0 and body[start - 1:start] not in (b"\n", b"\r"):
        start = body.rfind(marker, 0, start)
    if start < 0:
        raise Failure("the stream has no carrel.signature event")
    lines = body[start:-2].split(b"\n")
    if len(lines) != 2 or not lines[1].startswith(b"data:"):
        raise Failure("the carrel.signature event is not the last event, or is not one data line")
    data = lines[1][5:]
    if data.startswith(b" "):
        data = data[1:]
    try:
        event = json.loads(data)
        fields = {k: event[k] for k in ("content_digest", "signature_input", "signature")}
    except (ValueError, KeyError, TypeError):
        raise Failure("the carrel.signature event data is not the expected JSON object") from None
    if not all(isinstance(v, str) for v in fields.values()):
        raise Failure("the carrel.signature event fields are not strings")
    return body[:start], fields


def verify(jwks, response, stream, show_base=False):
    status = response["status"]
    headers = {}
    for name, value in response["headers"].items():
        if isinstance(value, list):
            value = ", ".join(v.strip(" \t") for v in value)
        name = name.lower()
        headers[name] = headers[name] + ", " + value if name in headers else value
    body = base64.b64decode(response["body_b64"], validate=True)

    if stream:
        content, event = split_stream(body)
        covered = dict(headers)
        covered["content-digest"] = event["content_digest"]
        kid = verify_signature(
            jwks, status, covered, event["signature_input"], event["signature"], show_base
        )
        check_content_digest(event["content_digest"], content)
    else:
        for name in ("signature-input", "signature", "content-digest"):
            if name not in headers:
                hint = ""
                if headers.get("content-type", "").lower().startswith("text/event-stream"):
                    hint = " (this is an event stream: use --stream)"
                raise Failure(f"the response has no {name} header{hint}")
        kid = verify_signature(
            jwks, status, headers, headers["signature-input"], headers["signature"], show_base
        )
        check_content_digest(headers["content-digest"], body)
    return kid


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jwks", required=True, help="the key set (JSON), e.g. from /.well-known/carrel/keys")
    ap.add_argument("--response", required=True, help="the saved response (JSON)")
    ap.add_argument("--stream", action="store_true", help="the body is an SSE stream ending in a carrel.signature event")
    ap.add_argument("--show-base", action="store_true", help="print the rebuilt signature base to stderr")
    args = ap.parse_args()
    try:
        with open(args.jwks, encoding="utf-8") as f:
            jwks = json.load(f)
        with open(args.response, encoding="utf-8") as f:
            response = json.load(f)
        if not isinstance(response.get("status"), int) or not isinstance(response.get("headers"), dict):
            raise ValueError("response.json needs an integer status and a headers object")
        base64.b64decode(response.get("body_b64", ""), validate=True)
    except (OSError, ValueError, binascii.Error, AttributeError) as e:
        print(f"error: cannot read the input: {e}", file=sys.stderr)
        return 2
    try:
        kid = verify(jwks, response, args.stream, args.show_base)
    except Failure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"ok kid={kid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
