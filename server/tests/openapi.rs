//! The OpenAPI document served at `/openapi.json` against the real server: every operation it
//! lists is called, and every answer (successes and errors alike) must match the schema the
//! document gives for that operation and status; an operation never called, or a status it
//! does not document, fails the test. The router and the document are built from one list of
//! handlers (`sai_services::http::api`), so the router serves no route the document lacks.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Server;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The document and what the test has checked against it.
struct Checker {
    doc: Value,
    http: String,
    called: BTreeSet<(String, String)>,
}

impl Checker {
    /// Calls `method path` (its `template` as the document writes it) and checks the answer;
    /// returns its status and body.
    fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.http);
        let agent = Server::agent();
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut resp = match (method, body) {
            ("get", _) => with_auth(agent.get(&url), &auth).call(),
            ("delete", _) => with_auth(agent.delete(&url), &auth).call(),
            ("post", b) => with_auth(agent.post(&url), &auth).send_json(b.unwrap_or(json!({}))),
            ("put", b) => with_auth(agent.put(&url), &auth).send_json(b.unwrap_or(json!({}))),
            _ => panic!("method {method}"),
        }
        .expect("http");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
        };
        self.check(method, template, status, &value);
        (status, value)
    }

    fn check(&mut self, method: &str, template: &str, status: u16, body: &Value) {
        let op = &self.doc["paths"][template][method];
        assert!(op.is_object(), "{method} {template} is not in the document");
        self.called.insert((method.to_string(), template.to_string()));
        let responses = &op["responses"];
        let answer = match &responses[status.to_string()] {
            Value::Null => &responses["default"],
            r => r,
        };
        assert!(
            answer.is_object(),
            "{method} {template} answered {status}, which the document does not list: {body}"
        );
        let schema = &answer["content"]["application/json"]["schema"];
        if schema.is_null() {
            assert!(
                body.is_null(),
                "{method} {template} {status}: no body documented, got {body}"
            );
            return;
        }
        // The response's schema, its $refs resolved in the document's components.
        let root = json!({"allOf": [schema], "components": self.doc["components"]});
        let validator = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{method} {template}: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{method} {template} {status}: {errors:?}\n{body}");
        undocumented_fields(&self.doc, schema, body, &format!("{method} {template} {status}"));
    }
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: &Option<String>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

/// The schema `$ref` names, or the schema itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
    {
        Some(name) => resolve(doc, &doc["components"]["schemas"][name]),
        None => schema,
    }
}

/// Every property the schema allows, following allOf / oneOf and $refs.
fn properties<'a>(doc: &'a Value, schema: &'a Value, out: &mut Vec<(&'a String, &'a Value)>) {
    let schema = resolve(doc, schema);
    if let Some(p) = schema["properties"].as_object() {
        out.extend(p.iter());
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for s in schema[key].as_array().into_iter().flatten() {
            properties(doc, s, out);
        }
    }
}

/// JSON Schema lets an object carry fields its schema does not name; the document must name
/// every field the server sends, so the test walks the answer and fails on one it does not.
fn undocumented_fields(doc: &Value, schema: &Value, body: &Value, at: &str) {
    let schema = resolve(doc, schema);
    match body {
        Value::Object(map) => {
            let mut props = Vec::new();
            properties(doc, schema, &mut props);
            if props.is_empty() {
                // A map (additionalProperties) or an opaque value (a message body).
                return;
            }
            for (k, v) in map {
                let p = props.iter().find(|(name, _)| *name == k);
                let p = p.unwrap_or_else(|| panic!("{at}: field {k} is not in the document"));
                undocumented_fields(doc, p.1, v, &format!("{at}.{k}"));
            }
        }
        Value::Array(items) => {
            let item = if schema["items"].is_object() {
                &schema["items"]
            } else {
                // An Option<Vec<..>>: oneOf null / array.
                schema["oneOf"]
                    .as_array()
                    .and_then(|alts| alts.iter().map(|a| resolve(doc, a)).find(|a| a["items"].is_object()))
                    .map(|a| &a["items"])
                    .unwrap_or(&Value::Null)
            };
            if item.is_object() {
                for v in items {
                    undocumented_fields(doc, item, v, at);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn every_route_answers_as_the_openapi_document_says() {
    let s = Server::start(&["--admin-token", "an-admin-token-of-some-length"]);
    let doc = Server::agent()
        .get(format!("{}/openapi.json", s.http))
        .call()
        .unwrap()
        .body_mut()
        .read_json::<Value>()
        .unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let mut c = Checker {
        doc: doc.clone(),
        http: s.http.clone(),
        called: BTreeSet::new(),
    };
    c.call("get", "/openapi.json", "/openapi.json", None, None);
    c.call("get", "/healthz", "/healthz", None, None);

    // Accounts.
    let reg = |c: &mut Checker, name: &str| {
        let body = json!({"username": name, "password": "correct horse", "nickname": name});
        let (st, v) = c.call("post", "/v1/users/register", "/v1/users/register", Some(body), None);
        assert_eq!(st, 201, "{v}");
        v["userId"].as_str().unwrap().to_string()
    };
    let login = |c: &mut Checker, name: &str| {
        let body = json!({"username": name, "password": "correct horse"});
        let (st, v) = c.call("post", "/v1/users/login", "/v1/users/login", Some(body), None);
        assert_eq!(st, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    let alice = reg(&mut c, "alice");
    let bob = reg(&mut c, "bob");
    let carol = reg(&mut c, "carol");
    let (ta, tb, tc) = (login(&mut c, "alice"), login(&mut c, "bob"), login(&mut c, "carol"));
    let (st, _) = c.call(
        "post",
        "/v1/users/register",
        "/v1/users/register",
        Some(json!({"username": "alice", "password": "correct horse"})),
        None,
    );
    assert_eq!(st, 409);
    let (st, _) = c.call(
        "post",
        "/v1/users/login",
        "/v1/users/login",
        Some(json!({"username": "alice"})),
        None,
    );
    assert_eq!(st, 400);
    let (st, _) = c.call(
        "post",
        "/v1/users/login",
        "/v1/users/login",
        Some(json!({"username": "alice", "password": "wrong password"})),
        None,
    );
    assert_eq!(st, 401);
    assert_eq!(c.call("get", "/v1/users/me", "/v1/users/me", None, Some(&ta)).0, 200);
    assert_eq!(c.call("get", "/v1/users/me", "/v1/users/me", None, None).0, 401);
    assert_eq!(
        c.call("get", "/v1/users", "/v1/users?username=bob", None, Some(&ta)).0,
        200
    );
    assert_eq!(
        c.call("get", "/v1/users/{id}", &format!("/v1/users/{bob}"), None, Some(&ta))
            .0,
        200
    );
    assert_eq!(
        c.call("get", "/v1/users/{id}", "/v1/users/nobody", None, Some(&ta)).0,
        404
    );

    // Friends.
    let (st, v) = c.call(
        "post",
        "/v1/friends/requests",
        "/v1/friends/requests",
        Some(json!({"toUserId": bob, "message": "hi"})),
        Some(&ta),
    );
    assert_eq!(st, 201, "{v}");
    let to_bob = v["requestId"].as_str().unwrap().to_string();
    let (st, v) = c.call("get", "/v1/friends/requests", "/v1/friends/requests", None, Some(&tb));
    assert_eq!((st, v["requests"].as_array().unwrap().len()), (200, 1));
    let accept = format!("/v1/friends/requests/{to_bob}/accept");
    assert_eq!(
        c.call("post", "/v1/friends/requests/{id}/accept", &accept, None, Some(&tb))
            .0,
        200
    );
    let (_, v) = c.call(
        "post",
        "/v1/friends/requests",
        "/v1/friends/requests",
        Some(json!({"toUserId": alice})),
        Some(&tc),
    );
    let from_carol = v["requestId"].as_str().unwrap().to_string();
    let reject = format!("/v1/friends/requests/{from_carol}/reject");
    assert_eq!(
        c.call("post", "/v1/friends/requests/{id}/reject", &reject, None, Some(&ta))
            .0,
        200
    );
    assert_eq!(
        c.call("post", "/v1/friends/requests/{id}/reject", &reject, None, Some(&ta))
            .0,
        409
    );
    let (_, v) = c.call(
        "post",
        "/v1/friends/requests",
        "/v1/friends/requests",
        Some(json!({"toUserId": carol})),
        Some(&ta),
    );
    let to_carol = format!("/v1/friends/requests/{}/accept", v["requestId"].as_str().unwrap());
    assert_eq!(
        c.call("post", "/v1/friends/requests/{id}/accept", &to_carol, None, Some(&tc))
            .0,
        200
    );
    let (_, v) = c.call("get", "/v1/friends", "/v1/friends", None, Some(&ta));
    assert_eq!(v["friends"].as_array().unwrap().len(), 2);
    let mut bob_ws = s.connect(&tb);
    let presence = format!("/v1/presence?userIds={bob},{carol}");
    let (_, v) = c.call("get", "/v1/presence", &presence, None, Some(&ta));
    assert_eq!(v["online"], json!({bob.clone(): true, carol.clone(): false}));

    // Conversations: one private message over WebSocket, then what HTTP shows of it.
    let mut alice_ws = s.connect(&ta);
    alice_ws.chat(&bob, "m1", "hello");
    let ack = alice_ws.recv();
    let conv = ack["data"]["conversationId"].as_str().unwrap().to_string();
    assert_eq!(bob_ws.recv()["method"], "push");
    let (_, v) = c.call("get", "/v1/conversations", "/v1/conversations", None, Some(&tb));
    assert_eq!(v["conversations"][0]["unread"], 1);
    let history = format!("/v1/conversations/{conv}/messages?limit=10");
    let (_, v) = c.call("get", "/v1/conversations/{id}/messages", &history, None, Some(&ta));
    assert_eq!(v["messages"][0]["status"], "sent");
    let bad = format!("/v1/conversations/{conv}/messages?limit=0");
    assert_eq!(
        c.call("get", "/v1/conversations/{id}/messages", &bad, None, Some(&ta))
            .0,
        400
    );
    let read = format!("/v1/conversations/{conv}/read");
    assert_eq!(
        c.call(
            "post",
            "/v1/conversations/{id}/read",
            &read,
            Some(json!({"readSeq": 1})),
            Some(&tb)
        )
        .0,
        200
    );
    assert_eq!(
        c.call("post", "/v1/conversations/{id}/read", &read, Some(json!({})), Some(&tb))
            .0,
        400
    );
    let reads = format!("/v1/conversations/{conv}/messages/1/reads");
    let (_, v) = c.call(
        "get",
        "/v1/conversations/{id}/messages/{seq}/reads",
        &reads,
        None,
        Some(&ta),
    );
    assert_eq!(v["readCount"], 1);
    assert_eq!(
        c.call("get", "/v1/conversations/{id}/messages", &history, None, Some(&tc))
            .0,
        403
    );

    // Groups.
    let (st, v) = c.call(
        "post",
        "/v1/groups",
        "/v1/groups",
        Some(json!({"name": "team", "memberIds": [bob]})),
        Some(&ta),
    );
    assert_eq!(st, 201, "{v}");
    let g = v["groupId"].as_str().unwrap().to_string();
    assert_eq!(c.call("get", "/v1/groups", "/v1/groups", None, Some(&tb)).0, 200);
    assert_eq!(
        c.call("get", "/v1/groups/{id}", &format!("/v1/groups/{g}"), None, Some(&tb))
            .0,
        200
    );
    assert_eq!(
        c.call("get", "/v1/groups/{id}", &format!("/v1/groups/{g}"), None, Some(&tc))
            .0,
        403
    );
    let members = format!("/v1/groups/{g}/members");
    let (st, v) = c.call(
        "post",
        "/v1/groups/{id}/members",
        &members,
        Some(json!({"userIds": [carol]})),
        Some(&ta),
    );
    assert_eq!((st, v["added"].as_array().unwrap().len()), (200, 1));
    let (_, v) = c.call("get", "/v1/groups/{id}/members", &members, None, Some(&tc));
    assert_eq!(v["members"].as_array().unwrap().len(), 3);
    let role = format!("/v1/groups/{g}/members/{bob}/role");
    let tmpl = "/v1/groups/{id}/members/{user_id}/role";
    assert_eq!(
        c.call("put", tmpl, &role, Some(json!({"role": "admin"})), Some(&ta)).0,
        204
    );
    assert_eq!(
        c.call("put", tmpl, &role, Some(json!({"role": "king"})), Some(&ta)).0,
        400
    );
    let member = format!("/v1/groups/{g}/members/{carol}");
    assert_eq!(
        c.call("delete", "/v1/groups/{id}/members/{user_id}", &member, None, Some(&tb))
            .0,
        204
    );

    // Friendship ends; the password changes; logout; the admin disables and enables.
    let unfriend = format!("/v1/friends/{carol}");
    assert_eq!(
        c.call("delete", "/v1/friends/{user_id}", &unfriend, None, Some(&ta)).0,
        204
    );
    let pw = json!({"currentPassword": "correct horse", "newPassword": "battery staple"});
    let (st, v) = c.call(
        "post",
        "/v1/users/me/password",
        "/v1/users/me/password",
        Some(pw),
        Some(&tc),
    );
    assert_eq!(st, 200, "{v}");
    let tc = v["token"].as_str().unwrap().to_string();
    assert_eq!(
        c.call("post", "/v1/users/logout", "/v1/users/logout", None, Some(&tc))
            .0,
        204
    );
    assert_eq!(
        c.call("post", "/v1/users/logout", "/v1/users/logout", None, Some(&tc))
            .0,
        401
    );
    let admin = Some("an-admin-token-of-some-length");
    let disable = format!("/v1/admin/users/{carol}/disable");
    assert_eq!(
        c.call("post", "/v1/admin/users/{id}/disable", &disable, None, admin).0,
        204
    );
    assert_eq!(
        c.call("post", "/v1/admin/users/{id}/disable", &disable, None, Some(&ta))
            .0,
        403
    );
    let enable = format!("/v1/admin/users/{carol}/enable");
    assert_eq!(
        c.call("post", "/v1/admin/users/{id}/enable", &enable, None, admin).0,
        204
    );

    // Every operation of the document was called.
    let listed: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .filter(|(m, _)| ["get", "post", "put", "delete"].contains(&m.as_str()))
        .collect();
    let missed: Vec<_> = listed.difference(&c.called).collect();
    assert!(missed.is_empty(), "operations never called: {missed:?}");
    // (The router is built from the same list as the document, so it serves no other route.)
    assert!(listed.len() >= 29, "{listed:?}");
}

/// The checks above can fail: a missing required field, a wrong type and a field the document
/// does not name are each caught.
#[test]
fn the_check_refuses_answers_that_differ_from_the_document() {
    let s = Server::start(&[]);
    let doc: Value = Server::agent()
        .get(format!("{}/openapi.json", s.http))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let fails = |body: Value| {
        let doc = doc.clone();
        std::panic::catch_unwind(move || {
            let mut c = Checker {
                doc,
                http: String::new(),
                called: BTreeSet::new(),
            };
            c.check("get", "/v1/groups/{id}/members", 200, &body);
        })
        .is_err()
    };
    let member = json!({"userId": "u1", "role": "owner", "joinedAt": 1});
    assert!(!fails(json!({"members": [member]})), "a right answer passes");
    assert!(
        fails(json!({"members": [{"userId": "u1", "role": "owner"}]})),
        "joinedAt missing"
    );
    assert!(
        fails(json!({"members": [{"userId": 7, "role": "owner", "joinedAt": 1}]})),
        "userId not a string"
    );
    assert!(
        fails(json!({"members": [member], "extra": 1})),
        "a field the document lacks"
    );
    assert!(
        fails(json!({"members": [{"userId": "u1", "role": "owner", "joinedAt": 1, "slot": 0}]})),
        "a nested one"
    );
}
