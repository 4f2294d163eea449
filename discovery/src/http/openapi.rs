//! The hand-written OpenAPI 3 document of the registry API. A test walks every path and
//! method listed here through the router, so the document cannot name a route that does not
//! exist.

use serde_json::{Value, json};

fn error_ref() -> Value {
    json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn op(summary: &str, params: &[&str], ok_status: &str, ok: Value, extra: &[&str]) -> Value {
    let mut parameters: Vec<Value> = params
        .iter()
        .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    for q in extra {
        parameters.push(
            json!({"name": q, "in": "query", "required": false, "schema": {"type": "string"}}),
        );
    }
    json!({
        "summary": summary,
        "parameters": parameters,
        "responses": { ok_status: ok, "default": error_ref() }
    })
}

fn json_ok(schema: &str) -> Value {
    json!({"description": "ok", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn text_ok() -> Value {
    json!({"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}})
}

fn html_ok() -> Value {
    json!({"description": "ok", "content": {"text/html": {"schema": {"type": "string"}}}})
}

fn any_ok() -> Value {
    json!({"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}})
}

fn with_body(mut op: Value, content: &[&str]) -> Value {
    let mut c = serde_json::Map::new();
    for ct in content {
        c.insert((*ct).to_string(), json!({"schema": {"type": "object"}}));
    }
    op["requestBody"] = json!({"required": true, "content": c});
    op
}

/// The document served at `/openapi.json`.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Tidings registry",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "lyft/discovery-compatible v1 API, v2 batch check-in and blocking queries. \
                Writes need `Authorization: Bearer <token>` when the registry has a secret. \
                Reads may carry `X-Tidings-Stale`, `X-Tidings-Warming` and `X-Tidings-Index`."
        },
        "paths": paths(),
        "components": {"schemas": schemas()}
    })
}

/// Every route of the registry API, by path and method.
fn paths() -> Value {
    let form_or_json = ["application/x-www-form-urlencoded", "application/json"];
    let no_content = json!({"description": "weight set"});
    json!({
        "/healthcheck": {"get": op("lyft health check", &[], "200", text_ok(), &[])},
        "/live": {"get": op("liveness", &[], "200", any_ok(), &[])},
        "/ready": {"get": op("readiness (503 while draining)", &[], "200", any_ok(), &[])},
        "/metrics": {"get": op("Prometheus metrics", &[], "200", text_ok(), &[])},
        "/openapi.json": {"get": op("this document", &[], "200", any_ok(), &[])},
        "/v1/ops/status": {"get": op("store kind, write auth (open or tokens), warm-up, self-preservation (expected vs actual renewals) and the last sweep", &[], "200", json_ok("Status"), &[])},
        "/ui": {"get": op("the web dashboard (HTML; its script and styles are under /ui/)", &[], "200", html_ok(), &[])},
        "/v1/registration/{service}": {
            "get": op("live hosts of a service", &["service"], "200", json_ok("V1Listing"), &[]),
            "post": with_body(op("check in one endpoint (lyft: tags merged over the stored ones; auto_ip=true without ip takes the caller's address)", &["service"], "200", any_ok(), &[]), &form_or_json)
        },
        "/v1/registration/{service}/{ip}": {
            "delete": op("deregister the service's endpoints on ip", &["service", "ip"], "200", any_ok(), &["port"])
        },
        "/v1/registration/repo/{repo}": {
            "get": op("live hosts by service_repo_name", &["repo"], "200", json_ok("V1RepoListing"), &[])
        },
        "/v1/loadbalancing/{service}": {
            "post": with_body(op("set the weight of every host (operator)", &["service"], "204", no_content.clone(), &[]), &form_or_json)
        },
        "/v1/loadbalancing/{service}/{ip}": {
            "post": with_body(op("set the weight of the hosts on ip", &["service", "ip"], "204", no_content, &[]), &form_or_json)
        },
        "/v2/checkin": {
            "post": with_body(op("check in all of a host's endpoints", &[], "200", json_ok("CheckInResponse"), &[]), &["application/json"])
        },
        "/v2/services": {"get": op("services with host counts", &[], "200", json_ok("ServicesResponse"), &[])},
        "/v2/services/{service}": {
            "get": op("blocking query on one service", &["service"], "200", json_ok("V1Listing"), &["index", "wait"])
        },
        "/v2/catalog": {
            "get": op("blocking query on every service; with delta=true a CatalogChanges answer (docs/API.md#catalog-deltas)", &[], "200", json_ok("Catalog"), &["index", "wait", "delta"])
        },
        "/v3/discovery:endpoints": {
            "post": with_body(op("Envoy EDS (REST-JSON): one ClusterLoadAssignment; 304 when version_info is current", &[], "200", json_ok("DiscoveryResponse"), &[]), &["application/json"])
        }
    })
}

/// The schemas the paths refer to (`#/components/schemas/...`).
fn schemas() -> Value {
    json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}
        },
        "V1Host": {"type": "object", "required": ["service", "ip_address", "port", "last_check_in"], "properties": {
            "service": {"type": "string"}, "ip_address": {"type": "string"}, "port": {"type": "integer"},
            "revision": {"type": "string"}, "service_repo_name": {"type": "string", "nullable": true},
            "last_check_in": {"type": "string", "format": "date-time"}, "tags": {"type": "object"}}},
        "V1Listing": {"type": "object", "properties": {"service": {"type": "string"}, "env": {"type": "string"},
            "hosts": {"type": "array", "items": {"$ref": "#/components/schemas/V1Host"}}}},
        "V1RepoListing": {"type": "object", "properties": {"service_repo_name": {"type": "string"},
            "env": {"type": "string"}, "hosts": {"type": "array", "items": {"$ref": "#/components/schemas/V1Host"}}}},
        "CheckInResponse": {"type": "object", "properties": {"accepted": {"type": "integer"}, "ttl_secs": {"type": "integer"}}},
        "ServicesResponse": {"type": "object", "properties": {"index": {"type": "integer"}, "services": {"type": "array",
            "items": {"type": "object", "properties": {"service": {"type": "string"}, "hosts": {"type": "integer"}}}}}},
        "Catalog": {"type": "object", "properties": {"index": {"type": "integer"}, "generated_at_ms": {"type": "integer"},
            "warming": {"type": "boolean"}, "stale": {"type": "boolean"}, "services": {"type": "object",
            "additionalProperties": {"type": "array", "items": {"$ref": "#/components/schemas/V1Host"}}}}},
        "CatalogChanges": {"type": "object", "properties": {"index": {"type": "integer"}, "generated_at_ms": {"type": "integer"},
            "warming": {"type": "boolean"}, "stale": {"type": "boolean"}, "full": {"type": "boolean"},
            "from": {"type": "integer"}, "digest": {"type": "string"}, "services": {"type": "object",
            "additionalProperties": {"type": "array", "items": {"$ref": "#/components/schemas/V1Host"}}},
            "removed": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "object",
                "properties": {"ip_address": {"type": "string"}, "port": {"type": "integer"}}}}},
            "removed_services": {"type": "array", "items": {"type": "string"}}}},
        "Status": {"type": "object", "properties": {
            "store": {"type": "string", "enum": ["memory", "dynamodb", "custom"]}, "env": {"type": "string"},
            "auth": {"type": "string", "enum": ["open", "tokens"]},
            "ready": {"type": "boolean"}, "warming": {"type": "boolean"}, "uptime_ms": {"type": "integer"},
            "ttl_ms": {"type": "integer"}, "check_in_interval_ms": {"type": "integer"},
            "self_preservation": {"type": "object", "properties": {
                "enabled": {"type": "boolean"}, "active": {"type": "boolean"}, "threshold": {"type": "number"},
                "expected_renewals": {"type": "integer"}, "min_renewals": {"type": "integer"},
                "renewals": {"type": "integer", "nullable": true}}},
            "last_sweep": {"type": "object", "nullable": true, "properties": {
                "ms_ago": {"type": "integer"}, "live": {"type": "integer"}, "stored": {"type": "integer"},
                "renewed": {"type": "integer"}, "deleted": {"type": "integer"}}},
            "last_sweep_error": {"type": "object", "nullable": true, "properties": {
                "ms_ago": {"type": "integer"}, "message": {"type": "string"}}}}},
        "DiscoveryResponse": {"type": "object", "description": "Envoy v3 DiscoveryResponse: version_info, type_url and zero or one ClusterLoadAssignment",
            "properties": {"version_info": {"type": "string"}, "type_url": {"type": "string"},
            "resources": {"type": "array", "maxItems": 1, "items": {"type": "object"}}}}
    })
}
