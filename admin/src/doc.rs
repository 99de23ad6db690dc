//! The OpenAPI document of the admin API, generated from the handlers' annotations.
//! `carrel openapi` prints it; `openapi/openapi.json` is the committed copy, checked in CI.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{accounts, audit, catalog, error, institutions, structure};

/// The admin API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Carrel admin API",
        description = "Control plane of Carrel, the Right-to-AI public access gateway: providers, \
                       models, institutions and API keys. Errors use the OpenAI error body; \
                       validation errors name the field in `error.param`.",
        license(name = "Apache-2.0")
    ),
    paths(
        catalog::create_provider,
        catalog::list_providers,
        catalog::create_model,
        catalog::list_models,
        institutions::create_institution,
        institutions::list_institutions,
        institutions::get_institution,
        institutions::create_key,
        institutions::list_keys,
        institutions::revoke_key,
        institutions::rotate_key,
        structure::create_site,
        structure::list_sites,
        structure::create_group,
        structure::list_groups,
        accounts::login,
        accounts::logout,
        accounts::me,
        accounts::create_user,
        accounts::list_users,
        audit::list,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "catalog", description = "Providers and the models they serve"),
        (name = "institutions", description = "Libraries, schools, small businesses, nonprofits"),
        (name = "keys", description = "API keys of an institution"),
        (name = "accounts", description = "Admin accounts, roles and sessions"),
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

/// The document as pretty JSON, with the crate version filled in.
pub fn openapi_json() -> String {
    let mut doc = AdminApi::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.to_pretty_json()
        .expect("the OpenAPI document serialises")
}

/// `GET /admin/openapi.json`.
pub async fn serve() -> Json<serde_json::Value> {
    Json(serde_json::from_str(&openapi_json()).expect("the document is JSON"))
}
