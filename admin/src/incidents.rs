//! Safeguard settings of an institution, and the incident register: automatic records of
//! blocks and flags, and reports that people file in terms that map to the AI Incident
//! Database and the OECD's AI incident framework. Exported as JSON.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::store::{Incident, MAX_TEXT_RETENTION_DAYS, NewIncident, SafeguardSettings};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;
use crate::query::AdminQuery;

/// Most webhooks an institution may list.
pub const MAX_NOTIFY_URLS: usize = 10;

fn check_settings(state: &AdminState, settings: &SafeguardSettings) -> Result<(), AdminError> {
    state
        .hooks
        .check_safeguards(settings)
        .map_err(|m| AdminError::field("sets", format!("sets: {m}")))?;
    if let Some(text) = &settings.minor_refusal
        && (text.trim().is_empty() || text.chars().count() > 500)
    {
        return Err(AdminError::field(
            "minor_refusal",
            "minor_refusal: 1 to 500 characters",
        ));
    }
    if settings.notify_urls.len() > MAX_NOTIFY_URLS {
        return Err(AdminError::field(
            "notify_urls",
            format!("notify_urls: at most {MAX_NOTIFY_URLS}"),
        ));
    }
    for url in &settings.notify_urls {
        let parsed = url::Url::parse(url).map_err(|e| {
            AdminError::field(
                "notify_urls",
                format!("notify_urls: `{url}` is not a URL ({e})"),
            )
        })?;
        let loopback = parsed.host_str().is_some_and(crate::patrons::is_loopback);
        if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
            return Err(AdminError::field(
                "notify_urls",
                "notify_urls: HTTPS only (plain HTTP only to loopback): incidents are sensitive",
            ));
        }
    }
    for r in &settings.retain_prompts {
        if r.days == 0 || r.days > MAX_TEXT_RETENTION_DAYS {
            return Err(AdminError::field(
                "retain_prompts",
                format!("retain_prompts: days is 1 to {MAX_TEXT_RETENTION_DAYS}"),
            ));
        }
    }
    Ok(())
}

/// Sets an institution's safeguards: rule sets on top of the operator's (and overrides within
/// bounds: locked operator rules cannot be weakened), the refusal minors read, the webhooks
/// that high-severity incidents notify, and any opt-in to keep prompt text in incident records
/// of a tier (1 to 90 days). Institution admins and operators may.
#[utoipa::path(put, path = "/admin/v1/institutions/{id}/safeguards", tag = "safeguards",
    params(("id" = String, Path, description = "Institution id")),
    request_body = SafeguardSettings,
    responses((status = 200, body = SafeguardSettings), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A rule does not compile, weakens a locked rule, or a \
            field is invalid; the message names it", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn put_safeguards(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<SafeguardSettings>,
) -> Result<Json<SafeguardSettings>, AdminError> {
    principal.authorize(Action::ManageInstitution, Some(&id))?;
    check_settings(&state, &body)?;
    if !state
        .store
        .set_safeguard_settings(&id, body.clone())
        .await?
    {
        return Err(AdminError::NotFound(format!("institution `{id}`")));
    }
    state.hooks.safeguards_changed(&id).await;
    state
        .audit(
            principal.actor(),
            "safeguards.update",
            format!("institution:{id}"),
            Some(&id),
        )
        .await;
    Ok(Json(body))
}

/// An institution's safeguard settings (the defaults when it set none).
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/safeguards", tag = "safeguards",
    params(("id" = String, Path, description = "Institution id")),
    responses((status = 200, body = SafeguardSettings), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_safeguards(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<SafeguardSettings>, AdminError> {
    principal.authorize(Action::Read, Some(&id))?;
    if state.store.get_institution(&id).await?.is_none() {
        return Err(AdminError::NotFound(format!("institution `{id}`")));
    }
    Ok(Json(state.store.safeguard_settings(&id).await?))
}

/// Kinds of harm, after the OECD AI Incidents Monitor's harm types.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HarmType {
    /// Injury or danger to a person's body.
    Physical,
    /// Distress, manipulation, harm to mental health.
    Psychological,
    /// Damage to someone's standing.
    Reputational,
    /// Loss of money or property.
    EconomicProperty,
    /// Harm to the environment.
    Environmental,
    /// Harm to public interest: misinformation, democratic processes, critical services.
    PublicInterest,
    /// Violation of human rights or civil liberties: privacy, discrimination, expression.
    HumanRights,
    /// None of these.
    Other,
}

/// How serious the incident was.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportSeverity {
    /// Little or no lasting effect.
    Low,
    /// Noticeable, recoverable harm.
    Medium,
    /// Serious harm, or harm to many.
    High,
    /// Death, grave injury, or irreversible harm.
    Critical,
}

/// A person's report of an AI incident or hazard. The fields map to the AI Incident Database
/// (title, description, date, alleged deployer, alleged developer, alleged harmed or nearly
/// harmed parties) and the OECD framework (harm type, severity, and `hazard`: an event that
/// could have led to harm but did not, as opposed to an incident).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentReport {
    /// A short title.
    #[schema(min_length = 1, max_length = 200)]
    pub title: String,
    /// What happened. Do not include patrons' names or card numbers.
    #[schema(min_length = 1, max_length = 10000)]
    pub description: String,
    /// The date it happened, `YYYY-MM-DD`.
    #[schema(format = Date, pattern = r"^\d{4}-\d{2}-\d{2}$")]
    pub date: String,
    /// Who deployed the AI system (e.g. the library, a vendor).
    #[schema(min_length = 1, max_length = 200)]
    pub alleged_deployer: String,
    /// Who developed the model or system.
    #[schema(min_length = 1, max_length = 200)]
    pub alleged_developer: String,
    /// Who was harmed or nearly harmed (groups, not named people).
    #[schema(min_items = 1, max_items = 20)]
    pub harmed_or_nearly_harmed_parties: Vec<String>,
    /// The model involved (a public model name).
    #[schema(min_length = 1, max_length = 200)]
    pub implicated_model: String,
    /// The kind of harm.
    #[schema(inline)]
    pub harm_type: HarmType,
    /// How serious.
    #[schema(inline)]
    pub severity: ReportSeverity,
    /// `true` for a hazard (a near miss: it could have caused harm and did not), `false` for an
    /// incident (harm happened).
    pub hazard: bool,
    /// The institution concerned: required from an operator; an institution's people report
    /// for their own.
    #[serde(default)]
    #[schema(nullable = false)]
    pub institution_id: Option<String>,
}

impl IncidentReport {
    fn validate(&self) -> Result<(), AdminError> {
        for (field, value, max) in [
            ("title", &self.title, 200),
            ("description", &self.description, 10_000),
            ("alleged_deployer", &self.alleged_deployer, 200),
            ("alleged_developer", &self.alleged_developer, 200),
            ("implicated_model", &self.implicated_model, 200),
        ] {
            let n = value.chars().count();
            if n == 0 || n > max {
                return Err(AdminError::field(
                    field,
                    format!("{field}: 1 to {max} characters"),
                ));
            }
        }
        let date_ok = self.date.len() == 10
            && self.date.parse::<jiff::civil::Date>().is_ok()
            && self.date.as_bytes()[4] == b'-';
        if !date_ok {
            return Err(AdminError::field("date", "date: a date, YYYY-MM-DD"));
        }
        let parties = &self.harmed_or_nearly_harmed_parties;
        if parties.is_empty() || parties.len() > 20 {
            return Err(AdminError::field(
                "harmed_or_nearly_harmed_parties",
                "harmed_or_nearly_harmed_parties: 1 to 20 entries",
            ));
        }
        Ok(())
    }
}

/// The JSON Schema of [`IncidentReport`] (draft 2020-12), as `GET /admin/schemas/incident-report.json`
/// publishes it and `openapi/incident-report.schema.json` holds.
pub fn report_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(<IncidentReport as utoipa::PartialSchema>::schema())
        .unwrap_or_default();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "$schema".into(),
            "https://json-schema.org/draft/2020-12/schema".into(),
        );
        obj.insert(
            "$id".into(),
            "https://carrel.invalid/schemas/incident-report.json".into(),
        );
        obj.insert("title".into(), "Carrel incident report".into());
        obj.insert("additionalProperties".into(), false.into());
    }
    schema
}

/// Files a report of an AI incident or hazard. Staff, institution admins and operators may.
#[utoipa::path(post, path = "/admin/v1/incidents", tag = "safeguards",
    request_body = IncidentReport,
    responses((status = 201, body = Incident), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "Not valid against the published schema; `param` names \
            the field", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn report_incident(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    AdminJson(body): AdminJson<IncidentReport>,
) -> Result<(StatusCode, Json<Incident>), AdminError> {
    body.validate()?;
    let institution = match (principal.institution(), &body.institution_id) {
        (Some(own), None) => own.to_owned(),
        (_, Some(id)) => id.clone(),
        (None, None) => {
            return Err(AdminError::field(
                "institution_id",
                "institution_id: required from an operator",
            ));
        }
    };
    principal.authorize(Action::ServePatrons, Some(&institution))?;
    if state.store.get_institution(&institution).await?.is_none() {
        return Err(AdminError::NotFound(format!("institution `{institution}`")));
    }
    let mut record = serde_json::to_value(&body).unwrap_or_default();
    if let Some(obj) = record.as_object_mut() {
        obj.insert("reported_by".into(), principal.actor().into());
        obj.remove("institution_id");
    }
    let incident = state
        .store
        .record_incident(NewIncident {
            source: "report".to_owned(),
            institution_id: Some(institution.clone()),
            record,
            prompt_text: None,
        })
        .await?;
    state
        .audit(
            principal.actor(),
            "incident.report",
            format!("incident:{}", incident.id),
            Some(&institution),
        )
        .await;
    Ok((StatusCode::CREATED, Json(incident)))
}

/// Incidents, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentList {
    /// The incidents.
    pub data: Vec<Incident>,
}

/// Exports incidents as JSON, newest first: every institution's for the operator, the caller's
/// own institution's otherwise.
#[utoipa::path(get, path = "/admin/v1/incidents", tag = "safeguards",
    params(("limit" = Option<u32>, Query, description = "At most this many, 1 to 500 (default 100)")),
    responses((status = 200, body = IncidentList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_incidents(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<IncidentList>, AdminError> {
    let scope = principal.institution().map(str::to_owned);
    principal.authorize(Action::ReadAudit, scope.as_deref())?;
    query.only(&["limit"])?;
    let limit = query.limit()?;
    Ok(Json(IncidentList {
        data: state.store.incidents(scope.as_deref(), limit).await?,
    }))
}

/// The published JSON Schema that `POST /admin/v1/incidents` validates against.
#[utoipa::path(get, path = "/admin/schemas/incident-report.json", tag = "safeguards",
    responses((status = 200, description = "JSON Schema (draft 2020-12)", body = Object)))]
pub async fn incident_schema() -> Json<serde_json::Value> {
    Json(report_schema())
}
