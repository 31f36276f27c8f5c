//! `GET /openapi.json`: the API's OpenAPI document, generated from the
//! handlers' annotations and the request and response types.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::{AppState, RequestLimits};

/// `/openapi.json`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// `GET /openapi.json`: this API, generated from the code, with this
/// server's configured limits.
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
pub(crate) async fn openapi_json(State(state): State<AppState>) -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_with(state.limits))
}

/// The API's OpenAPI document for a server configured with `limits`: the
/// bounds the defaults put in [`openapi`] replaced by the configured ones.
pub fn openapi_with(limits: RequestLimits) -> utoipa::openapi::OpenApi {
    let mut doc = openapi();
    let max_tokens = Some(limits.max_tokens);
    bound(&mut doc, "AskRequest", "max_tokens", Some(1), max_tokens);
    bound(&mut doc, "ChatRequest", "max_tokens", Some(1), max_tokens);
    bound(
        &mut doc,
        "AskRequest",
        "top_k",
        Some(1),
        Some(limits.max_top_k),
    );
    bound(
        &mut doc,
        "SummarizeRequest",
        "max_tokens",
        Some(1),
        max_tokens,
    );
    bound(
        &mut doc,
        "SummarizeRequest",
        "top_k",
        Some(1),
        Some(limits.max_top_k),
    );
    bound(
        &mut doc,
        "SearchRequest",
        "top_k",
        Some(1),
        Some(limits.max_top_k.max(100)),
    );
    doc
}

/// The schema of `field` of the object schema `schema`, if both are there.
fn property_mut<'a>(
    doc: &'a mut utoipa::openapi::OpenApi,
    schema: &str,
    field: &str,
) -> Option<&'a mut utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>> {
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    doc.components
        .as_mut()?
        .schemas
        .get_mut(schema)
        .and_then(|s| match s {
            RefOr::T(Schema::Object(o)) => o.properties.get_mut(field),
            // An object with further rules (see `OneSubject`): its first part.
            RefOr::T(Schema::AllOf(all)) => match all.items.first_mut() {
                Some(RefOr::T(Schema::Object(o))) => o.properties.get_mut(field),
                _ => None,
            },
            _ => None,
        })
}

/// Sets the `minimum` and `maximum` of the integer `field` of `schema`.
fn bound(
    doc: &mut utoipa::openapi::OpenApi,
    schema: &str,
    field: &str,
    minimum: Option<usize>,
    maximum: Option<usize>,
) {
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    // A field renamed or retyped fails the server's test of this function.
    if let Some(RefOr::T(Schema::Object(o))) = property_mut(doc, schema, field) {
        o.minimum = minimum.map(Into::into);
        o.maximum = maximum.map(Into::into);
    }
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
            crate::answers::ask, crate::answers::summarize, crate::openai::chat_completions, crate::openai::embeddings,
            crate::openai::models, crate::collections::list, crate::collections::create,
            crate::collections::remove, crate::sources::list_sources,
            crate::sources::add_source, crate::sources::get_source,
            crate::sources::remove_source, crate::sources::sync_source
        ),
        modifiers(
            &BearerAuth,
            &CollectionRoutes,
            &ServiceStatuses,
            &UniqueDocuments,
            &FilterGrammar,
            &OneSubject
        )
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

/// The routes on one collection's documents, again under
/// `/collections/{collection}` (the router nests the same handlers there):
/// the same operations with the `collection` parameter, ids suffixed
/// `_in_collection`.
struct CollectionRoutes;

impl utoipa::Modify for CollectionRoutes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::Required;
        let parameter = ParameterBuilder::new()
            .name("collection")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .description(Some("Collection name"))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"))
                    .build(),
            ))
            .build();
        for path in crate::collections::SCOPED_PATHS {
            let Some(mut item) = openapi.paths.paths.get(path).cloned() else {
                continue;
            };
            for op in [
                item.get.as_mut(),
                item.post.as_mut(),
                item.put.as_mut(),
                item.delete.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                op.parameters
                    .get_or_insert_with(Vec::new)
                    .insert(0, parameter.clone());
                op.operation_id = op
                    .operation_id
                    .take()
                    .map(|id| format!("{id}_in_collection"));
            }
            openapi
                .paths
                .paths
                .insert(format!("/collections/{{collection}}{path}"), item);
        }
    }
}

/// Every status the service's layers can answer, on every operation they
/// apply to, besides the ones each handler documents: a client generated from
/// the document then knows them all (schemathesis found them undocumented).
/// Which operations need a key comes from [`crate::auth::requirement`], the
/// function the auth middleware asks: the open ones are marked as needing
/// none (`security: []`).
struct ServiceStatuses;

impl utoipa::Modify for ServiceStatuses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use axum::http::Method;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            // The router's path, `{id}` standing for any id.
            let route = path.replace("{id}", "x").replace("{collection}", "c");
            for (method, op) in [
                (Method::GET, item.get.as_mut()),
                (Method::POST, item.post.as_mut()),
                (Method::PUT, item.put.as_mut()),
                (Method::DELETE, item.delete.as_mut()),
            ] {
                let Some(op) = op else { continue };
                let mut add = |status: &str, description: &str| {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(description));
                };
                let Some((scope, reach)) = crate::auth::requirement(&method, &route) else {
                    op.security = Some(Vec::new());
                    continue;
                };
                if matches!(reach, crate::auth::Reach::Collection(_)) {
                    add("404", "No such collection, or one this key does not reach");
                }
                add(
                    "401",
                    "Missing or unknown API key (when the server has keys)",
                );
                match scope {
                    crate::auth::Scope::Write => add("403", "Read key on a write route"),
                    crate::auth::Scope::Admin => add("403", "Not an admin key"),
                    crate::auth::Scope::Read => {}
                }
                add("408", "No response started within server.request_timeout_s");
                add("500", "Internal error (the detail is in the server's log)");
                add(
                    "503",
                    "Models still loading, or the database cannot be reached (Retry-After)",
                );
                if op.request_body.is_some() {
                    add(
                        "400",
                        "Malformed body (not JSON, or a broken multipart form)",
                    );
                    add("413", "Body larger than server.body_limit_bytes");
                    add("415", "Wrong or missing Content-Type");
                    add("422", "Invalid request");
                }
                if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                    add("422", "Invalid request");
                }
            }
        }
    }
}

/// `documents` of `POST /ingest` as `uniqueItems` (utoipa has no field
/// attribute for it): the same document twice is refused (its id repeats).
struct UniqueDocuments;

impl utoipa::Modify for UniqueDocuments {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::Schema;
        use utoipa::openapi::RefOr;
        if let Some(RefOr::T(Schema::Array(a))) =
            property_mut(openapi, "IngestRequest", "documents")
        {
            a.unique_items = true;
        }
    }
}

/// The `filter` of `/search` and `/ask` as [`ragd_core::Filter::parse`] reads
/// it (utoipa cannot derive it from a `serde_json::Value`): keys
/// `document_id` or `metadata.<key>`, each a string, number or boolean, or
/// `{"in": [one or more of those]}`.
struct FilterGrammar;

impl utoipa::Modify for FilterGrammar {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{
            ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
        };
        use utoipa::openapi::RefOr;
        let scalar = || {
            ObjectBuilder::new().schema_type(
                [Type::String, Type::Number, Type::Boolean]
                    .into_iter()
                    .collect::<SchemaType>(),
            )
        };
        let one_of = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("in", ArrayBuilder::new().items(scalar()).min_items(Some(1)))
            .required("in")
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::<Schema>::FreeForm(false),
            ));
        let condition = Schema::OneOf(OneOfBuilder::new().item(scalar()).item(one_of).build());
        let filter = |description: &str| {
            ObjectBuilder::new()
                .schema_type(
                    [Type::Object, Type::Null]
                        .into_iter()
                        .collect::<SchemaType>(),
                )
                .description(Some(description))
                .property_names(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some(r"^(document_id|metadata\.[\s\S]+)$")),
                ))
                .additional_properties(Some(condition.clone()))
                .build()
        };
        for name in ["SearchRequest", "AskRequest", "SummarizeRequest"] {
            if let Some(property) = property_mut(openapi, name, "filter") {
                if let RefOr::T(Schema::Object(old)) = property {
                    let description = old.description.clone().unwrap_or_default();
                    *property = RefOr::T(Schema::Object(filter(&description)));
                }
            }
        }
    }
}

/// `POST /summarize` takes exactly one of `document_id`, `filter` and
/// `query`, and `POST /sources` one of `url` and `path`, given (not null): a
/// `oneOf` of them (utoipa has no attribute for it).
struct OneSubject;

impl utoipa::Modify for OneSubject {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::Type;
        exactly_one_of(
            openapi,
            "SummarizeRequest",
            &[
                ("document_id", Type::String),
                ("filter", Type::Object),
                ("query", Type::String),
            ],
        );
        // A source is a URL or a folder.
        exactly_one_of(
            openapi,
            "SourceSpec",
            &[("url", Type::String), ("path", Type::String)],
        );
    }
}

/// Makes schema `name` require exactly one of `fields` (given, not null).
fn exactly_one_of(
    openapi: &mut utoipa::openapi::OpenApi,
    name: &str,
    fields: &[(&str, utoipa::openapi::schema::Type)],
) {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema};
    use utoipa::openapi::RefOr;
    let Some(RefOr::T(Schema::Object(request))) = openapi
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut(name))
    else {
        return;
    };
    let mut one_of = OneOfBuilder::new();
    for (field, kind) in fields {
        one_of = one_of.item(
            ObjectBuilder::new()
                .property(*field, ObjectBuilder::new().schema_type(kind.clone()))
                .required(*field)
                .build(),
        );
    }
    let mut all_of = utoipa::openapi::schema::AllOfBuilder::new()
        .item(Schema::Object(request.clone()))
        .item(Schema::OneOf(one_of.build()))
        .build();
    all_of.description = request.description.take();
    openapi
        .components
        .as_mut()
        .expect("checked above")
        .schemas
        .insert(name.into(), RefOr::T(Schema::AllOf(all_of)));
}
