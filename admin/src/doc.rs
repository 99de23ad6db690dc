//! The OpenAPI document of the admin API, generated from the handlers' annotations.
//! The gateway merges it with the public API's description (`carrel_gateway::api_doc`); that
//! whole document is what `carrel openapi` prints, the admin listener serves and
//! `openapi/openapi.json` holds, checked in CI.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{
    AdminState, accounts, audit, catalog, error, incidents, institutions, limits, patrons, reports,
    safeguards, sponsors, structure, tokens, usage,
};

/// The admin API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Carrel admin API",
        description = "Control plane of Carrel, the Right-to-AI public access gateway: providers, \
                       models, institutions and API keys. Errors use the OpenAI error body; \
                       validation errors name the field in `error.param`. On several replicas \
                       (`store.kind = \"redis\"`) a change answers `503` with code \
                       `state_unavailable` while Redis cannot be reached; nothing is changed \
                       then, and reads still answer.",
        license(name = "Apache-2.0")
    ),
    paths(
        catalog::create_provider,
        catalog::list_providers,
        catalog::create_model,
        catalog::list_models,
        catalog::create_price,
        catalog::list_prices,
        institutions::create_institution,
        institutions::list_institutions,
        institutions::get_institution,
        institutions::update_institution,
        usage::usage_report,
        reports::sector_report,
        sponsors::create_pool,
        sponsors::list_pools,
        sponsors::get_pool,
        sponsors::set_member,
        sponsors::top_up,
        sponsors::ledger,
        sponsors::settle_now,
        institutions::create_key,
        institutions::list_keys,
        institutions::revoke_key,
        institutions::rotate_key,
        institutions::update_key,
        structure::create_site,
        structure::list_sites,
        structure::create_group,
        structure::list_groups,
        limits::put_institution_limits,
        limits::get_institution_limits,
        limits::put_site_limits,
        limits::get_site_limits,
        limits::put_group_limits,
        limits::get_group_limits,
        limits::put_key_limits,
        limits::get_key_limits,
        limits::put_model_limits,
        limits::get_model_limits,
        limits::extend_patron,
        limits::reset_patron_day,
        patrons::put_patron_auth,
        patrons::get_patron_auth,
        patrons::import_patrons,
        patrons::create_guest_passes,
        patrons::list_guest_passes,
        accounts::login,
        accounts::logout,
        accounts::me,
        accounts::create_user,
        accounts::list_users,
        accounts::delete_user,
        audit::list,
        audit::tree_head,
        audit::tree_heads,
        audit::inclusion_proof,
        audit::consistency_proof,
        tokens::create_token,
        tokens::list_tokens,
        tokens::revoke_token,
        safeguards::contain_model,
        safeguards::contain_provider,
        safeguards::list_containment,
        safeguards::put_attestation,
        safeguards::get_attestation,
        safeguards::delete_attestation,
        incidents::put_safeguards,
        incidents::get_safeguards,
        incidents::report_incident,
        incidents::list_incidents,
        incidents::incident_schema,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "catalog", description = "Providers and the models they serve"),
        (name = "institutions", description = "Libraries, schools, small businesses, nonprofits"),
        (name = "keys", description = "API keys of an institution"),
        (name = "limits", description = "Request rates, token and money budgets and concurrent \
            streams by level (institution, site, group, key, model, and each patron), with what \
            each level has used; patrons' extensions and day resets"),
        (name = "accounts", description = "Admin accounts, roles and sessions"),
        (name = "safeguards", description = "Containment switches for models, providers, \
            institutions and keys (operator only), and frontier attestations of service keys"),
        (name = "patrons", description = "How patrons sign in (SIP2, a local list, OIDC), the \
            local list, and guest passes"),
        (name = "sponsors", description = "Sponsor pools: a funder's money for chosen \
            institutions, paid out in a documented order, with a ledger of top-ups and draws"),
    )
)]
pub struct AdminApi;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `GET /admin/openapi.json`: [`AdminState::openapi`], as built at start-up. Needs no token:
/// the document is published in the repository anyway.
pub async fn serve(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.to_string(),
    )
}
