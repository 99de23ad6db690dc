//! How an institution's patrons sign in: the sign-in settings (SIP2, a local list, OIDC), the
//! local list's import, and guest passes.
//!
//! Secrets go in and never come out: SIP2 passwords are write-only (a read says whether one is
//! set), card numbers become patron references and PINs argon2id hashes before anything is
//! stored, and a guest code is shown once, when it is made. The audit trail records counts and
//! ids, never a card or a code.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::AgeBand;
use carrel_core::patrons::{GuestCode, PatronAuth};
use carrel_core::store::{GuestPass, LocalPatron, NewGuestPass};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;

/// Most patrons one import takes (each PIN costs an argon2id hash, tens of milliseconds).
pub const MAX_IMPORT_PATRONS: usize = 5_000;
/// Largest import body.
pub const MAX_IMPORT_BYTES: usize = 1024 * 1024;
/// Most guest passes made at once.
pub const MAX_GUEST_PASSES: u64 = 100;
/// Most tokens one guest pass allows.
pub const MAX_GUEST_TOKENS: u64 = 10_000_000;

/// The settings as a read shows them: passwords replaced by whether they are set.
fn view(auth: &PatronAuth) -> Value {
    let mut v = serde_json::to_value(auth).expect("settings serialise");
    if let Value::Object(map) = &mut v {
        for secret in ["login_password", "terminal_password"] {
            if let Some(value) = map.remove(secret) {
                map.insert(format!("{secret}_set"), Value::Bool(!value.is_null()));
            }
        }
    }
    v
}

fn check_oidc(s: &carrel_core::oidc::OidcSettings) -> Result<(), AdminError> {
    for (field, value) in [("issuer", &s.issuer), ("audience", &s.audience)] {
        AdminError::check_name(field, value, 512)?;
    }
    let url = url::Url::parse(&s.jwks_url)
        .ok()
        .filter(|u| matches!(u.scheme(), "https" | "http") && u.host().is_some())
        .ok_or_else(|| AdminError::field("jwks_url", "jwks_url: must be an http(s) URL"))?;
    if url.scheme() == "http" && !is_loopback(url.host_str().unwrap_or_default()) {
        return Err(AdminError::field(
            "jwks_url",
            "jwks_url: must be https (plain http only to this machine)",
        ));
    }
    for claim in [&s.age_claim, &s.group_claim].into_iter().flatten() {
        AdminError::check_name("claim", claim, 128)?;
    }
    Ok(())
}

/// Whether `host` is loopback (`localhost`, or a loopback address, bracketed or not).
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Sets how the institution's patrons sign in: `{"kind":"sip2",…}`, `{"kind":"local"}` or
/// `{"kind":"oidc",…}`. SIP2 without TLS is refused unless the host is loopback or listed in
/// `patrons.sip2_plaintext_hosts`. Institution admins and operators may.
#[utoipa::path(put, path = "/admin/v1/institutions/{id}/patron-auth", tag = "patrons",
    params(("id" = String, Path, description = "Institution id")),
    request_body(content = Object, description = "`{\"kind\":\"sip2\",\"host\",\"port\",\"tls\",\"login_user\",\"login_password\",\"location_code\",\"institution_id\",\"terminal_password\"?,\"checksums\",\"charset\",\"terminator\"?,\"timeout_ms\"?,\"age_bands\"?}`, `{\"kind\":\"local\"}` or `{\"kind\":\"oidc\",\"issuer\",\"audience\",\"jwks_url\",\"age_claim\"?,\"group_claim\"?,\"age_bands\"?}`"),
    responses(
        (status = 200, description = "The settings, passwords replaced by `…_set`", body = Object),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn put_patron_auth(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(auth): AdminJson<PatronAuth>,
) -> Result<Json<Value>, AdminError> {
    principal.authorize(Action::ManageInstitution, Some(&id))?;
    let inst = state.institution(&id).await?;
    match &auth {
        PatronAuth::Sip2(sip2) => sip2
            .validate(|host| {
                carrel_core::sip2::client::plaintext_allowed(host, &state.sip2_plaintext_hosts)
            })
            .map_err(|message| {
                let field = message
                    .split('`')
                    .nth(1)
                    .filter(|f| !f.contains(' '))
                    .unwrap_or("tls")
                    .to_owned();
                AdminError::field(field, message)
            })?,
        PatronAuth::Oidc(oidc) => check_oidc(oidc)?,
        PatronAuth::Local {} => {}
    }
    state.store.set_patron_auth(&inst.id, auth.clone()).await?;
    if let PatronAuth::Sip2(sip2) = &auth
        && !sip2.tls
    {
        tracing::warn!(institution = %inst.id, host = %sip2.host,
            "SIP2 without TLS: card numbers and PINs cross the network in the clear");
    }
    state
        .audit(
            principal.actor(),
            "patron_auth.set",
            format!("institution:{} kind:{}", inst.id, auth.kind()),
            Some(&inst.id),
        )
        .await;
    Ok(Json(view(&auth)))
}

/// How the institution's patrons sign in (passwords replaced by whether they are set);
/// `{"kind": null}` before it is set.
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/patron-auth", tag = "patrons",
    params(("id" = String, Path, description = "Institution id")),
    responses(
        (status = 200, description = "The settings, passwords replaced by `…_set`", body = Object),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn get_patron_auth(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    principal.authorize(Action::Read, Some(&id))?;
    let inst = state.institution(&id).await?;
    // An institution that has not chosen yet signs no patrons in: `{"kind": null}`.
    let auth = state.store.patron_auth(&inst.id).await?;
    Ok(Json(
        auth.as_ref()
            .map_or_else(|| serde_json::json!({"kind": null}), view),
    ))
}

/// What an import did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImportResult {
    /// Patrons new to the list.
    pub added: u64,
    /// Patrons already on it whose PIN (and band) were replaced.
    pub updated: u64,
    /// Patrons on the list now.
    pub total: u64,
}

/// One line of an import: `card,pin` or `card,pin,age_band`.
fn parse_line(n: usize, line: &str) -> Result<Option<(String, String, AgeBand)>, AdminError> {
    let line = line.trim_end_matches('\r');
    if line.trim().is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        // The line number, never its content: it holds a card and a PIN.
        AdminError::field("body", format!("line {n}: {why}"))
    };
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    if n == 1
        && fields
            .first()
            .is_some_and(|f| f.eq_ignore_ascii_case("card"))
    {
        return Ok(None);
    }
    let (card, pin, band) = match fields.as_slice() {
        [card, pin] => (*card, *pin, AgeBand::Unknown),
        [card, pin, band] => (
            *card,
            *pin,
            band.parse()
                .map_err(|_| bad("the age band must be under13, minor, adult or unknown"))?,
        ),
        _ => return Err(bad("expected `card,pin` or `card,pin,age_band`")),
    };
    let card_chars = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if card.is_empty() || card.len() > 64 || !card.chars().all(card_chars) {
        return Err(bad(
            "the card must be 1 to 64 letters, digits, `.`, `_` or `-`",
        ));
    }
    if pin.is_empty() || pin.len() > 64 {
        return Err(bad("the PIN must be 1 to 64 characters"));
    }
    Ok(Some((card.to_owned(), pin.to_owned(), band)))
}

/// Imports a local patron list: CSV, one `card,pin` (or `card,pin,age_band`) per line, an
/// optional `card,pin` header. Cards are stored as patron references and PINs as argon2id
/// hashes; a card already on the list gets the new PIN. At most 5,000 lines (each PIN takes
/// tens of milliseconds to hash). Institution admins and operators may.
#[utoipa::path(post, path = "/admin/v1/institutions/{id}/patrons", tag = "patrons",
    params(("id" = String, Path, description = "Institution id")),
    request_body(content = String, content_type = "text/csv",
        description = "`card,pin` or `card,pin,age_band` per line; cards are letters, digits, `.`, `_` and `-`"),
    responses(
        (status = 200, body = ImportResult),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 422, description = "A line is invalid (the message gives its number), or the list is over 1 MiB or 5,000 patrons", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn import_patrons(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<ImportResult>, AdminError> {
    principal.authorize(Action::ManageInstitution, Some(&id))?;
    let inst = state.institution(&id).await?;
    if body.len() > MAX_IMPORT_BYTES {
        return Err(AdminError::field(
            "body",
            format!(
                "the list is too long: {}",
                "a patron list of at most {MAX_IMPORT_BYTES} bytes"
            ),
        ));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| AdminError::field("body", "the list must be UTF-8 text"))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(row) = parse_line(i + 1, line)? {
            rows.push(row);
        }
        if rows.len() > MAX_IMPORT_PATRONS {
            return Err(AdminError::field(
                "body",
                format!(
                    "the list is too long: {}",
                    "at most {MAX_IMPORT_PATRONS} patrons per import"
                ),
            ));
        }
    }
    if rows.is_empty() {
        return Err(AdminError::field("body", "the list has no patrons"));
    }
    let pepper = state.pepper.clone();
    let inst_id = inst.id.clone();
    let patrons = tokio::task::spawn_blocking(move || {
        rows.into_iter()
            .map(|(card, pin, band)| LocalPatron {
                patron_ref: pepper.patron_ref(&inst_id, &card),
                pin_hash: carrel_core::passwords::hash(&pin),
                age_band: band,
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| AdminError::Internal(carrel_core::store::StoreError::Task(e.to_string())))?;
    let counts = state.store.import_local_patrons(&inst.id, patrons).await?;
    let total = state.store.count_local_patrons(&inst.id).await?;
    state
        .audit(
            principal.actor(),
            "patrons.import",
            format!(
                "institution:{} added:{} updated:{}",
                inst.id, counts.added, counts.updated
            ),
            Some(&inst.id),
        )
        .await;
    Ok(Json(ImportResult {
        added: counts.added,
        updated: counts.updated,
        total,
    }))
}

/// Body of `POST /admin/v1/institutions/{id}/guest-passes`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGuestPasses {
    /// Tokens each guest may use.
    #[schema(minimum = 1, maximum = 10_000_000, example = 20000)]
    pub tokens: u64,
    /// How many passes (default 1).
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 100)]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// A new guest pass, with its code (shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct NewPass {
    /// `gp_…`.
    pub id: String,
    /// The code to give the guest, `XXXX-XXXX-XXXX`. Not shown again.
    pub code: String,
    /// Tokens the guest may use.
    pub tokens: u64,
    /// RFC 3339: the institution's next local midnight.
    pub expires_at: String,
}

/// Guest passes, as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct GuestPassList {
    /// Passes not yet expired, newest first (never their codes).
    pub data: Vec<GuestPass>,
}

/// New passes.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewPasses {
    /// The passes with their codes.
    pub data: Vec<NewPass>,
}

/// Makes one-day guest passes: each code signs a guest in at a kiosk until the institution's
/// next local midnight, for at most `tokens`. Codes are argon2id-hashed at rest and shown only
/// here. Staff and admins of the institution may.
#[utoipa::path(post, path = "/admin/v1/institutions/{id}/guest-passes", tag = "patrons",
    params(("id" = String, Path, description = "Institution id")),
    request_body = CreateGuestPasses,
    responses(
        (status = 201, body = NewPasses),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_guest_passes(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<CreateGuestPasses>,
) -> Result<(StatusCode, Json<NewPasses>), AdminError> {
    principal.authorize(Action::ServePatrons, Some(&id))?;
    if !(1..=MAX_GUEST_TOKENS).contains(&body.tokens) {
        return Err(AdminError::field(
            "tokens",
            format!("tokens: must be a whole number from 1 to {MAX_GUEST_TOKENS}"),
        ));
    }
    if !(1..=MAX_GUEST_PASSES).contains(&body.count) {
        return Err(AdminError::field(
            "count",
            format!("count: must be a whole number from 1 to {MAX_GUEST_PASSES}"),
        ));
    }
    let inst = state.institution(&id).await?;
    let expires_at = next_local_midnight(&inst.timezone);
    let tokens = body.tokens;
    let count = body.count;
    let (codes, passes) = tokio::task::spawn_blocking(move || {
        (0..count)
            .map(|_| {
                let code = GuestCode::generate();
                let pass = NewGuestPass {
                    id: code.pass_id.clone(),
                    code_hash: carrel_core::passwords::hash(&code.secret),
                    tokens,
                    expires_at,
                };
                (code, pass)
            })
            .unzip::<_, _, Vec<_>, Vec<_>>()
    })
    .await
    .map_err(|e| AdminError::Internal(carrel_core::store::StoreError::Task(e.to_string())))?;
    let made = state
        .store
        .create_guest_passes(&inst.id, passes, principal.actor())
        .await?;
    state
        .audit(
            principal.actor(),
            "guest_pass.create",
            format!(
                "institution:{} passes:{} tokens:{tokens}",
                inst.id,
                made.iter()
                    .map(|p| p.id.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Some(&inst.id),
        )
        .await;
    let data = codes
        .iter()
        .zip(&made)
        .map(|(code, pass)| NewPass {
            id: pass.id.clone(),
            code: code.printed(),
            tokens: pass.tokens,
            expires_at: carrel_core::domain::rfc3339(pass.expires_at),
        })
        .collect();
    Ok((StatusCode::CREATED, Json(NewPasses { data })))
}

/// The institution's guest passes that have not expired (never their codes).
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/guest-passes", tag = "patrons",
    params(("id" = String, Path, description = "Institution id")),
    responses(
        (status = 200, body = GuestPassList),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn list_guest_passes(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<GuestPassList>, AdminError> {
    principal.authorize(Action::ServePatrons, Some(&id))?;
    let inst = state.institution(&id).await?;
    let now = carrel_core::domain::unix_now();
    let data = state.store.list_guest_passes(&inst.id, now).await?;
    Ok(Json(GuestPassList { data }))
}

/// Unix seconds of the next midnight in `timezone`.
fn next_local_midnight(timezone: &str) -> i64 {
    let zone = jiff::tz::TimeZone::get(timezone).unwrap_or(jiff::tz::TimeZone::UTC);
    let now = jiff::Timestamp::now().to_zoned(zone);
    now.date()
        .tomorrow()
        .ok()
        .and_then(|d| d.to_zoned(now.time_zone().clone()).ok())
        .map_or(now.timestamp().as_second() + 86_400, |z| {
            z.timestamp().as_second()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_lines_are_checked_without_echoing_them() {
        assert_eq!(parse_line(1, "card,pin").unwrap(), None);
        assert_eq!(parse_line(2, "  ").unwrap(), None);
        assert_eq!(
            parse_line(2, "2123400, 4321 ,minor\r").unwrap(),
            Some(("2123400".into(), "4321".into(), AgeBand::Minor))
        );
        for bad in ["2123400", "2123400,4321,elder", ",4321", "2123400,"] {
            let err = parse_line(3, bad).unwrap_err().to_string();
            assert!(err.contains("line 3") && !err.contains("2123400"), "{err}");
        }
    }

    #[test]
    fn a_read_says_whether_passwords_are_set_and_never_what_they_are() {
        let auth: PatronAuth = serde_json::from_str(
            r#"{"kind":"sip2","host":"127.0.0.1","port":6001,"tls":false,"login_user":"u",
            "login_password":"s3cret","location_code":"l","institution_id":"i",
            "checksums":true,"charset":"utf-8"}"#,
        )
        .unwrap();
        let v = view(&auth);
        assert!(!v.to_string().contains("s3cret"));
        assert_eq!(v["login_password_set"], true);
        assert_eq!(v["terminal_password_set"], false);
    }

    #[test]
    fn passes_end_at_the_next_local_midnight() {
        let at = next_local_midnight("America/Chicago");
        let now = jiff::Timestamp::now().as_second();
        assert!(at > now && at <= now + 25 * 3600);
        let local = jiff::Timestamp::from_second(at)
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::get("America/Chicago").unwrap());
        assert_eq!((local.hour(), local.minute()), (0, 0));
    }
}
