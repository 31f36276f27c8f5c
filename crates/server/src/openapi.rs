//! `GET /openapi.json`: the API's OpenAPI document, generated from the
//! handlers' annotations and the request and response types.

use axum::routing::get;
use axum::{Json, Router};

use crate::AppState;

/// `/openapi.json`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// `GET /openapi.json`: this API, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    #[derive(utoipa::OpenApi)]
    #[openapi(
        info(title = "ragd", description = "Retrieval-augmented question answering over your documents."),
        paths(
            crate::service::index, crate::service::health, crate::service::ready,
            crate::service::metrics, openapi_json, crate::documents::ingest,
            crate::answers::search, crate::documents::list_documents,
            crate::documents::get_document, crate::documents::delete_document,
            crate::answers::ask, crate::openai::chat_completions, crate::openai::embeddings,
            crate::openai::models
        ),
        modifiers(&BearerAuth)
    )]
    struct ApiDoc;
    ApiDoc::openapi()
}

/// Declares the bearer API keys (see [`crate::auth`]).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("read or write API key, when the server has keys"))
                    .build(),
            ),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "api_key",
            Vec::<String>::new(),
        )]);
    }
}
