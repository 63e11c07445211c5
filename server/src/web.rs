//! The web chat client (`web/` in the repository), compiled into the binary and served beside
//! the HTTP API of the embedded default, so that `cargo run --release --bin sai-im` is all it
//! takes to try it: open `http://<http_listen>/`.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/app.css");

/// A file of the client. `no-cache` (and no validator): a browser fetches it again each time,
/// so an upgraded server's page is never mixed with a cached script of the old one.
fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body)
}

/// `/`, `/app.js`, `/app.css`, and `/client.json`: what the page needs to know to connect
/// (the gateway's WebSocket port `ws_port`; the page takes the host from its own address).
pub fn router(ws_port: u16) -> Router {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route(
            "/app.js",
            get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route("/app.css", get(|| async { file("text/css; charset=utf-8", STYLE) }))
        .route(
            "/client.json",
            get(move || async move { Json(serde_json::json!({ "wsPort": ws_port, "wsPath": "/ws" })) }),
        )
}
