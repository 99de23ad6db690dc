//! Admin accounts: users, login, logout and `me`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{AdminToken, AdminUser, Role};
use carrel_core::passwords;
use carrel_core::store::{NewUser, Page};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal, SESSION_PREFIX};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;
use crate::query::{AdminQuery, PageParams};

/// How long a login session lasts.
pub const SESSION_TTL_SECS: i64 = 12 * 60 * 60;

/// Login attempts one client address may make at once, before the throttle starts.
pub const LOGIN_BURST: u32 = 10;
/// After the burst, one more attempt per address per this long.
pub const LOGIN_REFILL: Duration = Duration::from_secs(30);

/// Throttles login attempts per client address (GCRA), on top of the per-account lockout:
/// the lockout stops guessing one account's password, this stops one address spraying many.
pub struct LoginThrottle {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
}

impl std::fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginThrottle")
            .field("addresses", &self.limiter.len())
            .finish()
    }
}

impl Default for LoginThrottle {
    fn default() -> Self {
        let quota = governor::Quota::with_period(LOGIN_REFILL)
            .expect("a non-zero period")
            .allow_burst(NonZeroU32::new(LOGIN_BURST).expect("a non-zero burst"));
        LoginThrottle {
            limiter: governor::RateLimiter::keyed(quota),
        }
    }
}

impl LoginThrottle {
    /// Takes one attempt for `addr`, or says how many seconds until the next is allowed.
    fn check(&self, addr: IpAddr) -> Result<(), i64> {
        // Forget addresses that have been quiet long enough to be back at a full burst, so the
        // table stays bounded by recent traffic.
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&addr).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            wait.as_secs().max(1) as i64
        })
    }
}

/// Body of `POST /admin/v1/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Unique login name: 3 to 64 letters, digits, `.`, `_`, `-` or `@`.
    #[schema(example = "desk@springfield", pattern = "^[A-Za-z0-9._@-]{3,64}$")]
    pub username: String,
    /// 12 to 256 characters; stored only as an argon2id hash.
    #[schema(min_length = 12, max_length = 256)]
    pub password: String,
    /// What the account may do.
    pub role: Role,
    /// The institution; required for every role but `operator`, which must not have one.
    #[serde(default)]
    pub institution_id: Option<String>,
}

/// Body of `POST /admin/v1/login`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// Login name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A new session.
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    /// Send as `Authorization: Bearer <token>`. Stored only as a keyed hash.
    pub token: String,
    /// RFC 3339 time the session ends.
    pub expires_at: String,
    /// The account.
    pub user: AdminUser,
}

/// Who the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// The caller's role.
    pub role: Role,
    /// The account; absent for the operator's bearer token and for automation tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<AdminUser>,
    /// The automation token, with its institution and scopes, when the caller is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<AdminToken>,
}

fn check_username(name: &str) -> Result<(), AdminError> {
    let ok = (3..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(AdminError::field(
            "username",
            "username: must be 3 to 64 letters, digits, '.', '_', '-' or '@'",
        ))
    }
}

/// Creates an admin account. Operators create any; an institution admin creates accounts of
/// its own institution, never operators.
#[utoipa::path(post, path = "/admin/v1/users", tag = "accounts",
    request_body = CreateUser,
    responses(
        (status = 201, body = AdminUser),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The caller's role may not create this account", body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 409, description = "Username taken", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_user(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    AdminJson(body): AdminJson<CreateUser>,
) -> Result<(StatusCode, Json<AdminUser>), AdminError> {
    match (body.role, &body.institution_id) {
        (Role::Operator, Some(_)) => {
            return Err(AdminError::field(
                "institution_id",
                "institution_id: an operator belongs to no institution",
            ));
        }
        (Role::InstitutionAdmin | Role::Staff | Role::Auditor, None) => {
            return Err(AdminError::field(
                "institution_id",
                "institution_id: required for this role",
            ));
        }
        _ => {}
    }
    principal.authorize(Action::ManageUsers, body.institution_id.as_deref())?;
    check_username(&body.username)?;
    passwords::check_new(&body.password)
        .map_err(|m| AdminError::field("password", format!("password: {m}")))?;
    let password = body.password;
    let password_hash = tokio::task::spawn_blocking(move || passwords::hash(&password))
        .await
        .map_err(|e| AdminError::Internal(carrel_core::store::StoreError::Task(e.to_string())))?;
    let user = state
        .store
        .create_user(NewUser {
            username: body.username,
            password_hash,
            role: body.role,
            institution_id: body.institution_id,
        })
        .await?;
    tracing::info!(user = %user.id, role = %user.role, "admin account created");
    state
        .audit(
            principal.actor(),
            "user.create",
            format!("user:{}", user.id),
            user.institution_id.as_deref(),
        )
        .await;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Lists admin accounts, oldest first: all of them for the operator, the caller's
/// institution's otherwise.
#[utoipa::path(get, path = "/admin/v1/users", tag = "accounts",
    params(PageParams),
    responses((status = 200, body = Page<AdminUser>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_users(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<Page<AdminUser>>, AdminError> {
    let scope = principal.institution().map(str::to_owned);
    principal.authorize(Action::Read, scope.as_deref())?;
    let page = query.page()?;
    Ok(Json(state.store.list_users(scope.as_deref(), page).await?))
}

/// Deletes an admin account: its sessions end and the automation tokens it made are revoked at
/// once. Operators delete any account; an institution admin, those of its institution.
#[utoipa::path(delete, path = "/admin/v1/users/{id}", tag = "accounts",
    params(("id" = String, Path, description = "User id")),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn delete_user(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<StatusCode, AdminError> {
    let not_found = || AdminError::NotFound(format!("user `{id}`"));
    let user = state.store.get_user(&id).await?.ok_or_else(not_found)?;
    // An operator account belongs to no institution: to anyone else it does not exist.
    if user.institution_id.is_none() && principal.role() != Role::Operator {
        return Err(not_found());
    }
    principal
        .authorize(Action::ManageUsers, user.institution_id.as_deref())
        .map_err(|e| match e {
            AdminError::NotFound(_) => not_found(),
            other => other,
        })?;
    if !state.store.delete_user(&id).await? {
        return Err(not_found());
    }
    tracing::info!(user = %id, "admin account deleted");
    state
        .audit(
            principal.actor(),
            "user.delete",
            format!("user:{id}"),
            user.institution_id.as_deref(),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Signs in: returns a session token. Five failed attempts within 15 minutes lock the account
/// for 15 minutes (429 with `Retry-After`).
#[utoipa::path(post, path = "/admin/v1/login", tag = "accounts",
    request_body = Login,
    responses(
        (status = 200, body = Session),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Wrong username or password", body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 429, description = "Account locked after failed logins, or too many attempts \
                                        from this address", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<AdminState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    AdminJson(body): AdminJson<Login>,
) -> Result<Json<Session>, AdminError> {
    if let Some(Extension(ConnectInfo(addr))) = peer {
        state
            .login_throttle
            .check(addr.ip())
            .map_err(|retry_after| AdminError::TooManyLogins { retry_after })?;
    }
    let now = carrel_core::domain::unix_now();
    let password = body.password;
    let Some(record) = state.store.login_record(&body.username).await? else {
        // As slow as a real check, so timing does not reveal which usernames exist.
        let _ = tokio::task::spawn_blocking(move || passwords::verify_nobody(&password)).await;
        return Err(AdminError::InvalidCredentials);
    };
    if let Some(until) = record.locked_until
        && until > now
    {
        return Err(AdminError::AccountLocked {
            retry_after: until - now,
        });
    }
    let stored = record.password_hash;
    let matches = tokio::task::spawn_blocking(move || passwords::verify(&password, &stored))
        .await
        .unwrap_or(false);
    let user = record.user;
    if !matches {
        tracing::info!(user = %user.id, "failed admin login");
        let target = format!("user:{}", user.id);
        let inst = user.institution_id.as_deref();
        state
            .audit(
                "anonymous".to_owned(),
                "session.login_failed",
                target.clone(),
                inst,
            )
            .await;
        if let Some(until) = state.store.record_login_failure(&user.id, now).await? {
            tracing::warn!(user = %user.id, "admin account locked after failed logins");
            state
                .audit("anonymous".to_owned(), "user.locked", target, inst)
                .await;
            return Err(AdminError::AccountLocked {
                retry_after: until - now,
            });
        }
        return Err(AdminError::InvalidCredentials);
    }
    state.store.clear_login_failures(&user.id).await?;
    let token = format!("{SESSION_PREFIX}{}", carrel_core::ids::random_base62(43));
    let expires = now + SESSION_TTL_SECS;
    state
        .store
        .create_session(state.pepper.hash_secret(&token), &user.id, expires)
        .await?;
    let expires_at = carrel_core::domain::rfc3339(expires);
    tracing::info!(user = %user.id, "admin signed in");
    state
        .audit(
            format!("user:{}", user.id),
            "session.login",
            format!("user:{}", user.id),
            user.institution_id.as_deref(),
        )
        .await;
    Ok(Json(Session {
        token,
        expires_at,
        user,
    }))
}

/// Ends the caller's session. A no-op for the operator's token and for automation tokens,
/// which end with `DELETE /admin/v1/tokens/{id}`.
#[utoipa::path(post, path = "/admin/v1/logout", tag = "accounts",
    responses((status = 204, description = "Signed out"), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn logout(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    headers: http::HeaderMap,
) -> Result<StatusCode, AdminError> {
    let token = crate::auth::bearer(&headers).filter(|t| t.starts_with(SESSION_PREFIX));
    if let Some(token) = token {
        state
            .store
            .delete_session(state.pepper.hash_secret(token))
            .await?;
        state
            .audit(
                principal.actor(),
                "session.logout",
                principal.actor(),
                principal.institution(),
            )
            .await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Who the caller is.
#[utoipa::path(get, path = "/admin/v1/me", tag = "accounts",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn me(Extension(principal): Extension<AdminPrincipal>) -> Json<Me> {
    Json(Me {
        role: principal.role(),
        user: principal.user().cloned(),
        token: match &principal {
            AdminPrincipal::Token(t) => Some(t.clone()),
            AdminPrincipal::Operator | AdminPrincipal::User(_) => None,
        },
    })
}
