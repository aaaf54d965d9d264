//! An in-process Confluent Schema Registry: the subset of its REST API that candlestream,
//! schema_registry_converter and avro_schema.sh use, with the registry's status codes and
//! error bodies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Registry {
    /// Schema text by id (ids start at 1, like the real registry).
    schemas: Vec<String>,
    /// Ids of each version, per subject.
    subjects: BTreeMap<String, Vec<u32>>,
    compatibility: String,
    subject_compatibility: BTreeMap<String, String>,
}

#[derive(Clone)]
struct Shared {
    registry: Arc<Mutex<Registry>>,
    /// HTTP status every request gets while set (0: none, the registry works).
    outage: Arc<AtomicU16>,
}

pub struct FakeRegistry {
    pub addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

fn not_found(code: u32, message: &str) -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({"error_code": code, "message": message}),
    )
}

impl FakeRegistry {
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    /// Binds `port` (0 = any), so a test can start the registry late on a port it chose.
    pub async fn start_on(port: u16) -> Self {
        let shared = Shared {
            registry: Arc::new(Mutex::new(Registry {
                compatibility: "BACKWARD".into(),
                ..Default::default()
            })),
            outage: Arc::new(AtomicU16::new(0)),
        };
        let app = Router::new()
            .route("/subjects", get(list_subjects))
            .route("/subjects/{subject}", post(lookup))
            .route(
                "/subjects/{subject}/versions",
                post(register).get(list_versions),
            )
            .route("/subjects/{subject}/versions/{version}", get(version))
            .route("/schemas/ids/{id}", get(by_id))
            .route("/config", get(get_config).put(put_config))
            .route(
                "/config/{subject}",
                get(get_subject_config).put(put_subject_config),
            )
            .layer(axum::middleware::from_fn_with_state(shared.clone(), outage))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind registry");
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        Self { addr, shared, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While down, every request gets 503, as a registry behind a load balancer answers
    /// during an outage.
    pub fn set_down(&self, down: bool) {
        self.fail_with(if down { 503 } else { 0 });
    }

    /// Every request gets `status` (e.g. 500, which schema_registry_converter does not retry by
    /// itself) until called again with 0.
    pub fn fail_with(&self, status: u16) {
        self.shared.outage.store(status, Ordering::SeqCst);
    }

    /// Registers a schema directly; returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        register_schema(&mut self.shared.registry.lock().unwrap(), subject, schema).0
    }

    pub fn subjects(&self) -> Vec<String> {
        self.shared
            .registry
            .lock()
            .unwrap()
            .subjects
            .keys()
            .cloned()
            .collect()
    }

    pub fn latest(&self, subject: &str) -> Option<(u32, String)> {
        let r = self.shared.registry.lock().unwrap();
        let id = *r.subjects.get(subject)?.last()?;
        Some((id, r.schemas[id as usize - 1].clone()))
    }

    pub fn compatibility(&self, subject: Option<&str>) -> Option<String> {
        let r = self.shared.registry.lock().unwrap();
        match subject {
            None => Some(r.compatibility.clone()),
            Some(s) => r.subject_compatibility.get(s).cloned(),
        }
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn outage(
    State(s): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match s.outage.load(Ordering::SeqCst) {
        0 => {}
        status => {
            let status = StatusCode::from_u16(status).expect("HTTP status");
            return reply(
                status,
                json!({"error_code": status.as_u16() as u32 * 100 + 1, "message": "outage"}),
            );
        }
    }
    next.run(req).await
}

/// Canonical form for comparing schemas: parsed JSON, so whitespace does not matter.
fn canonical(schema: &str) -> String {
    serde_json::from_str::<Value>(schema)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| schema.to_string())
}

/// Returns (id, version); an identical schema keeps its id, as in the real registry.
fn register_schema(r: &mut Registry, subject: &str, schema: &str) -> (u32, usize) {
    let schema = canonical(schema);
    let id = match r.schemas.iter().position(|s| *s == schema) {
        Some(i) => i as u32 + 1,
        None => {
            r.schemas.push(schema);
            r.schemas.len() as u32
        }
    };
    let versions = r.subjects.entry(subject.to_string()).or_default();
    if let Some(pos) = versions.iter().position(|v| *v == id) {
        return (id, pos + 1);
    }
    versions.push(id);
    (id, versions.len())
}

fn schema_of(body: &Value) -> Result<String, Box<Response>> {
    let schema = body.get("schema").and_then(Value::as_str);
    let kind = body
        .get("schemaType")
        .and_then(Value::as_str)
        .unwrap_or("AVRO");
    match schema {
        Some(s) if kind == "AVRO" && serde_json::from_str::<Value>(s).is_ok() => Ok(s.to_string()),
        _ => Err(Box::new(reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error_code": 42201, "message": "Either the input schema or one of its references is invalid"}),
        ))),
    }
}

async fn register(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let schema = match schema_of(&body) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (id, _) = register_schema(&mut s.registry.lock().unwrap(), &subject, &schema);
    reply(StatusCode::OK, json!({"id": id}))
}

async fn lookup(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let schema = match schema_of(&body) {
        Ok(s) => canonical(&s),
        Err(r) => return *r,
    };
    let r = s.registry.lock().unwrap();
    let Some(versions) = r.subjects.get(&subject) else {
        return not_found(40401, "Subject not found.");
    };
    match versions
        .iter()
        .position(|id| r.schemas[*id as usize - 1] == schema)
    {
        Some(pos) => reply(
            StatusCode::OK,
            json!({"subject": subject, "id": versions[pos], "version": pos + 1, "schema": schema}),
        ),
        None => not_found(40403, "Schema not found"),
    }
}

async fn list_subjects(State(s): State<Shared>) -> Response {
    reply(
        StatusCode::OK,
        json!(
            s.registry
                .lock()
                .unwrap()
                .subjects
                .keys()
                .collect::<Vec<_>>()
        ),
    )
}

async fn list_versions(State(s): State<Shared>, Path(subject): Path<String>) -> Response {
    match s.registry.lock().unwrap().subjects.get(&subject) {
        Some(v) => reply(StatusCode::OK, json!((1..=v.len()).collect::<Vec<_>>())),
        None => not_found(40401, "Subject not found."),
    }
}

async fn version(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Response {
    let r = s.registry.lock().unwrap();
    let Some(versions) = r.subjects.get(&subject) else {
        return not_found(40401, "Subject not found.");
    };
    let index = match version.as_str() {
        "latest" => versions.len().checked_sub(1),
        v => v
            .parse::<usize>()
            .ok()
            .and_then(|v| v.checked_sub(1))
            .filter(|i| *i < versions.len()),
    };
    match index {
        Some(i) => {
            let id = versions[i];
            reply(
                StatusCode::OK,
                json!({"subject": subject, "version": i + 1, "id": id, "schema": r.schemas[id as usize - 1]}),
            )
        }
        None => not_found(40402, "Version not found."),
    }
}

async fn by_id(State(s): State<Shared>, Path(id): Path<u32>) -> Response {
    let r = s.registry.lock().unwrap();
    match id.checked_sub(1).and_then(|i| r.schemas.get(i as usize)) {
        Some(schema) => reply(StatusCode::OK, json!({"schema": schema})),
        None => not_found(40403, "Schema not found"),
    }
}

const LEVELS: &[&str] = &[
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
];

fn level_of(body: &Value) -> Result<String, Box<Response>> {
    match body.get("compatibility").and_then(Value::as_str) {
        Some(l) if LEVELS.contains(&l) => Ok(l.to_string()),
        _ => Err(Box::new(reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error_code": 42203, "message": "Invalid compatibility level"}),
        ))),
    }
}

async fn get_config(State(s): State<Shared>) -> Response {
    reply(
        StatusCode::OK,
        json!({"compatibilityLevel": s.registry.lock().unwrap().compatibility}),
    )
}

async fn put_config(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    match level_of(&body) {
        Ok(level) => {
            s.registry.lock().unwrap().compatibility = level.clone();
            reply(StatusCode::OK, json!({"compatibility": level}))
        }
        Err(r) => *r,
    }
}

async fn get_subject_config(State(s): State<Shared>, Path(subject): Path<String>) -> Response {
    match s
        .registry
        .lock()
        .unwrap()
        .subject_compatibility
        .get(&subject)
    {
        Some(level) => reply(StatusCode::OK, json!({"compatibilityLevel": level})),
        None => not_found(
            40408,
            "Subject does not have subject-level compatibility configured",
        ),
    }
}

async fn put_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    match level_of(&body) {
        Ok(level) => {
            s.registry
                .lock()
                .unwrap()
                .subject_compatibility
                .insert(subject, level.clone());
            reply(StatusCode::OK, json!({"compatibility": level}))
        }
        Err(r) => *r,
    }
}
