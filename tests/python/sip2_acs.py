"""A library system's SIP2 server for Carrel's end-to-end tests, built on pysip2 (its AnyIO
TCP server), which Carrel's authors did not write.

Prints `port <n>` once listening, then one line per event the test checks (`login ok`,
`patron <outcome>`, `end-session`), never a card number or a PIN. Runs until stdin closes.

Patrons: card 21234000000001 / PIN 4321 is valid; card 21234000000002 / PIN 4321 is blocked
(charge privileges denied); any other card is unknown (BL=N). A wrong PIN gets BL=Y, CQ=N.
"""

import sys

import anyio

from pysip2 import SIP2Server
from pysip2.models import (
    EndPatronSessionRequest,
    EndSessionResponse,
    LoginRequest,
    LoginResponse,
    PatronInformationRequest,
    PatronInformationResponse,
)
from pysip2.routes import END_PATRON_SESSION, LOGIN, PATRON_INFORMATION

VALID = "21234000000001"
BLOCKED = "21234000000002"
PIN = "4321"


def say(line: str) -> None:
    print(line, flush=True)


def main_server() -> SIP2Server:
    server = SIP2Server(encoding="utf-8", institution_id="carrel-test")

    @server.route(LOGIN)
    async def login(req: LoginRequest, ctx) -> LoginResponse:
        ok = req.login_user_id == "kiosk-sc" and req.login_password == "sc-password"
        say(f"login {'ok' if ok else 'refused'}")
        return LoginResponse(ok="1" if ok else "0")

    @server.route(PATRON_INFORMATION)
    async def patron_information(req: PatronInformationRequest, ctx) -> PatronInformationResponse:
        known = req.patron_identifier in (VALID, BLOCKED)
        pin_ok = known and req.patron_password == PIN
        blocked = req.patron_identifier == BLOCKED
        outcome = "unknown" if not known else ("wrong-pin" if not pin_ok else ("blocked" if blocked else "valid"))
        say(f"patron {outcome}")
        status = ("Y" if blocked else " ") + " " * 13
        return PatronInformationResponse(
            patron_status=status,
            language="001",
            transaction_date=ctx.now_18(),
            hold_items_count="0000",
            overdue_items_count="0000",
            charged_items_count="0000",
            fine_items_count="0000",
            recall_items_count="0000",
            unavailable_holds_count="0000",
            institution_id=req.institution_id,
            patron_identifier=req.patron_identifier,
            # A name and an address the gateway must never keep or log.
            personal_name="Ana Lopez" if known else "",
            home_address="12 Elm St" if known else None,
            valid_patron="Y" if known else "N",
            valid_patron_password="Y" if pin_ok else "N",
        )

    @server.route(END_PATRON_SESSION)
    async def end_session(req: EndPatronSessionRequest, ctx) -> EndSessionResponse:
        say("end-session")
        return EndSessionResponse(
            end_session="Y",
            transaction_date=ctx.now_18(),
            institution_id=req.institution_id,
            patron_identifier=req.patron_identifier,
        )

    return server


async def main() -> None:
    server = main_server()
    async with server.start(host="127.0.0.1", port=0) as port:
        say(f"port {port}")
        # Serve until the test closes stdin.
        await anyio.to_thread.run_sync(sys.stdin.read)


if __name__ == "__main__":
    anyio.run(main)
