//! A fake InfluxDB 2.x write endpoint, `POST /api/v2/write`, checking what the real one checks:
//! the `Token` authorization, org and bucket, the precision, and gzip bodies. Accepted lines are
//! kept, keyed like InfluxDB keys points (series + timestamp), so rewrites overwrite.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Store {
    /// (series, timestamp) → fields
    points: BTreeMap<(String, String), String>,
    requests: usize,
    /// The token InfluxDB accepts; an operator can rotate it.
    token: String,
}

pub struct FakeInflux2 {
    pub addr: std::net::SocketAddr,
    store: Arc<Mutex<Store>>,
    stop: CancellationToken,
}

#[derive(Clone)]
struct Expect {
    org: String,
    bucket: String,
    store: Arc<Mutex<Store>>,
}

impl FakeInflux2 {
    pub async fn start(org: &str, bucket: &str, token: &str) -> Self {
        let store = Arc::new(Mutex::new(Store {
            token: token.into(),
            ..Default::default()
        }));
        let expect = Expect {
            org: org.into(),
            bucket: bucket.into(),
            store: store.clone(),
        };
        let app = Router::new()
            .route("/api/v2/write", post(write))
            .with_state(expect);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        Self { addr, store, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stored points as full lines, sorted.
    pub fn lines(&self) -> Vec<String> {
        let store = self.store.lock().unwrap();
        store
            .points
            .iter()
            .map(|((series, ts), fields)| format!("{series} {fields} {ts}"))
            .collect()
    }

    /// Accepts `token` from now on, as after an operator fixed the token.
    pub fn set_token(&self, token: &str) {
        self.store.lock().unwrap().token = token.into();
    }

    pub fn requests(&self) -> usize {
        self.store.lock().unwrap().requests
    }
}

impl Drop for FakeInflux2 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> (StatusCode, String) {
    (
        status,
        json!({"code": code, "message": message}).to_string(),
    )
}

async fn write(
    State(expect): State<Expect>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let token = {
        let mut store = expect.store.lock().unwrap();
        store.requests += 1;
        store.token.clone()
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    if header("authorization") != format!("Token {token}") {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unauthorized access",
        );
    }
    if q.get("org") != Some(&expect.org) {
        return error(
            StatusCode::NOT_FOUND,
            "not found",
            &format!("organization name {:?} not found", q.get("org")),
        );
    }
    if q.get("bucket") != Some(&expect.bucket) {
        return error(
            StatusCode::NOT_FOUND,
            "not found",
            &format!("bucket {:?} not found", q.get("bucket")),
        );
    }
    if q.get("precision").map(String::as_str) != Some("ns") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "this fake expects precision=ns",
        );
    }
    if header("content-encoding") != "gzip" {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "this fake expects a gzip body",
        );
    }
    let mut text = String::new();
    if flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut text)
        .is_err()
    {
        return error(StatusCode::BAD_REQUEST, "invalid", "body is not gzip");
    }
    let mut store = expect.store.lock().unwrap();
    for line in text.lines().filter(|l| !l.is_empty()) {
        // Escaped spaces only occur in series keys here; split on the last two plain spaces.
        let mut parts = line.rsplitn(3, ' ');
        let (Some(ts), Some(fields), Some(series)) = (parts.next(), parts.next(), parts.next())
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("unable to parse {line:?}"),
            );
        };
        store
            .points
            .insert((series.to_string(), ts.to_string()), fields.to_string());
    }
    (StatusCode::NO_CONTENT, String::new())
}
