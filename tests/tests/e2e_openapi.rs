//! The API references `docs/openapi/kms.yaml` and `docs/openapi/server.yaml` against the live
//! services (real SoftHSM token, real KMS and server processes, real sockets):
//!
//! * every served path is documented and every documented path is served: the routers are
//!   built from route tables (`progressdb_kms::http::client_routes`, `admin_routes`,
//!   `large_body_routes`, `progressdb::http::v1::routes`), and the documented paths must
//!   be exactly the tables' paths;
//! * every path serves exactly its documented methods: each method is sent to each path on
//!   its documented endpoint, and only the documented ones get something other than 405;
//! * every answer to a set of good and bad requests covering every operation has a
//!   documented status, content type and a body that validates against the documented
//!   schema (a small JSON Schema validator for the subset the documents use), and every
//!   operation's success answer is among them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use progressdb_e2e::{KmsBuilder, ServerBuilder};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 exchange (status, headers and body as sent), over a Unix socket or TCP.

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn exchange<S: Read + Write>(
    mut s: S,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // A server may answer (413) and close before it has read the whole body: a failed write
    // is not a failure, the answer is what counts.
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer to {method} {target}: {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Answer {
        status: status.parse().unwrap(),
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Where a request goes.
#[derive(Clone, Debug)]
enum Target {
    Unix(PathBuf),
    Tcp(u16),
}

impl Target {
    fn send(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        match self {
            Target::Unix(p) => {
                let s = std::os::unix::net::UnixStream::connect(p).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                exchange(s, method, target, headers, body)
            }
            Target::Tcp(port) => {
                let s = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                exchange(s, method, target, headers, body)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The document, and a validator for the JSON Schema subset it uses.

struct Spec {
    name: &'static str,
    doc: Value,
    patterns: std::cell::RefCell<BTreeMap<String, regex::Regex>>,
    /// (method, path template) → statuses seen.
    seen: std::cell::RefCell<BTreeMap<(String, String), BTreeSet<u16>>>,
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

impl Spec {
    fn load(name: &'static str) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/openapi")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(doc["openapi"], "3.1.0", "{name}");
        Spec {
            name,
            doc,
            patterns: Default::default(),
            seen: Default::default(),
        }
    }

    fn paths(&self) -> BTreeMap<String, Value> {
        self.doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The documented methods of `path` (lower case), with each operation's `x-endpoint`.
    fn methods(&self, path: &str) -> BTreeMap<String, String> {
        self.doc["paths"][path]
            .as_object()
            .unwrap_or_else(|| panic!("{}: no path {path}", self.name))
            .iter()
            .filter(|(m, _)| METHODS.contains(&m.as_str()) || m.as_str() == "head")
            .map(|(m, op)| {
                let ep = op["x-endpoint"].as_str().unwrap_or("both").to_owned();
                (m.clone(), ep)
            })
            .collect()
    }

    fn deref<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            let ptr = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external $ref {r}"));
            v = self
                .doc
                .pointer(ptr)
                .unwrap_or_else(|| panic!("{}: dangling $ref {r}", self.name));
        }
        v
    }

    /// Checks `a`, the answer to `method` on the documented `path`: its status is documented
    /// for that operation, its content type is one documented for that status, and its body
    /// validates against that schema.
    fn check(&self, method: &str, path: &str, a: &Answer) {
        let m = method.to_ascii_lowercase();
        let op = &self.doc["paths"][path][&m];
        assert!(
            op.is_object(),
            "{}: {method} {path} is not documented",
            self.name
        );
        let responses = &op["responses"];
        let code = a.status.to_string();
        let resp = responses.get(&code).or_else(|| responses.get("default"));
        let Some(resp) = resp else {
            panic!(
                "{}: {method} {path} answered {} which is not documented: {}",
                self.name,
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        };
        let resp = self.deref(resp);
        let ctx = format!("{}: {method} {path} -> {}", self.name, a.status);
        match resp.get("content").and_then(Value::as_object) {
            None => assert!(
                a.body.is_empty(),
                "{ctx}: documented without a body, answered {:?}",
                String::from_utf8_lossy(&a.body)
            ),
            Some(content) => {
                let ct = a.header("content-type").unwrap_or("");
                let media = ct.split(';').next().unwrap().trim();
                let (_, entry) = content
                    .iter()
                    .find(|(k, _)| k.split(';').next().unwrap().trim() == media)
                    .unwrap_or_else(|| {
                        panic!(
                            "{ctx}: content type {ct:?} not documented ({:?})",
                            content.keys()
                        )
                    });
                if media == "application/json" {
                    let v: Value = serde_json::from_slice(&a.body).unwrap_or_else(|e| {
                        panic!(
                            "{ctx}: not JSON ({e}): {}",
                            String::from_utf8_lossy(&a.body)
                        )
                    });
                    if let Some(schema) = entry.get("schema") {
                        if let Err(e) = self.validate(schema, &v, "$") {
                            panic!("{ctx}: {e}\nbody: {v}");
                        }
                    }
                }
            }
        }
        self.seen
            .borrow_mut()
            .entry((m, path.to_owned()))
            .or_default()
            .insert(a.status);
    }

    fn validate(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let s = self.deref(schema);
        if let Some(options) = s.get("oneOf").and_then(Value::as_array) {
            let ok = options
                .iter()
                .filter(|o| self.validate(o, v, at).is_ok())
                .count();
            if ok != 1 {
                let errs: Vec<String> = options
                    .iter()
                    .filter_map(|o| self.validate(o, v, at).err())
                    .collect();
                return Err(format!("{at}: {ok} of the oneOf options match: {errs:?}"));
            }
        }
        if let Some(t) = s.get("type") {
            let types: Vec<&str> = match t {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => return Err(format!("{at}: bad type in schema")),
            };
            let actual = match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            let fits =
                types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
            if !fits {
                return Err(format!("{at}: is {actual}, documented {types:?}"));
            }
        }
        if let Some(c) = s.get("const") {
            if c != v {
                return Err(format!("{at}: is {v}, documented const {c}"));
            }
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            if !e.contains(v) {
                return Err(format!("{at}: {v} is not in the documented enum {e:?}"));
            }
        }
        match v {
            Value::String(text) => {
                let n = text.chars().count() as u64;
                if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
                    if n < min {
                        return Err(format!("{at}: length {n} < minLength {min}"));
                    }
                }
                if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
                    if n > max {
                        return Err(format!("{at}: length {n} > maxLength {max}"));
                    }
                }
                if let Some(p) = s.get("pattern").and_then(Value::as_str) {
                    let mut cache = self.patterns.borrow_mut();
                    let re = cache
                        .entry(p.to_owned())
                        .or_insert_with(|| regex::Regex::new(p).unwrap());
                    if !re.is_match(text) {
                        return Err(format!("{at}: {text:?} does not match {p}"));
                    }
                }
            }
            Value::Number(n) => {
                let x = n.as_f64().unwrap();
                if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
                    if x < min {
                        return Err(format!("{at}: {x} < minimum {min}"));
                    }
                }
                if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
                    if x > max {
                        return Err(format!("{at}: {x} > maximum {max}"));
                    }
                }
            }
            Value::Array(items) => {
                if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
                    if (items.len() as u64) < min {
                        return Err(format!("{at}: {} items < minItems {min}", items.len()));
                    }
                }
                if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
                    if items.len() as u64 > max {
                        return Err(format!("{at}: {} items > maxItems {max}", items.len()));
                    }
                }
                if let Some(item) = s.get("items") {
                    for (i, x) in items.iter().enumerate() {
                        self.validate(item, x, &format!("{at}[{i}]"))?;
                    }
                }
            }
            Value::Object(map) => {
                if let Some(req) = s.get("required").and_then(Value::as_array) {
                    for r in req.iter().filter_map(Value::as_str) {
                        if !map.contains_key(r) {
                            return Err(format!("{at}: required field {r:?} missing"));
                        }
                    }
                }
                let props = s.get("properties").and_then(Value::as_object);
                for (k, x) in map {
                    match props.and_then(|p| p.get(k)) {
                        Some(ps) => self.validate(ps, x, &format!("{at}.{k}"))?,
                        None => match s.get("additionalProperties") {
                            Some(Value::Bool(false)) => {
                                return Err(format!("{at}: field {k:?} is not documented"))
                            }
                            Some(extra @ Value::Object(_)) => {
                                self.validate(extra, x, &format!("{at}.{k}"))?
                            }
                            _ => {}
                        },
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Every documented operation got at least one 2xx answer in this run.
    fn assert_every_success_seen(&self) {
        let seen = self.seen.borrow();
        let mut missing = Vec::new();
        for (path, item) in self.paths() {
            for m in METHODS {
                if item.get(m).is_some() {
                    let ok = seen
                        .get(&(m.to_owned(), path.clone()))
                        .is_some_and(|s| s.iter().any(|c| (200..300).contains(c)));
                    if !ok {
                        missing.push(format!("{m} {path}"));
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "{}: no success answer checked for {missing:?}",
            self.name
        );
    }
}

/// `template` with its `{param}`s replaced by `values`.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut s = template.to_owned();
    for (k, v) in values {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Sends every method to `template` (filled with `params`) at `target`; returns the methods
/// not answered 405, and checks each 405 against the path's documented 405.
fn served_methods(
    spec: &Spec,
    target: &Target,
    template: &str,
    params: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> BTreeSet<String> {
    let path = fill(template, params);
    let documented = spec.methods(template);
    let any_op = documented.keys().next().unwrap().clone();
    METHODS
        .iter()
        .filter(|m| {
            let a = target.send(&m.to_ascii_uppercase(), &path, headers, b"");
            if a.status == 405 {
                spec.check(&any_op, template, &a);
            }
            a.status != 405
        })
        .map(|m| (*m).to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn kms_reference_matches_the_live_routes() {
    use progressdb_kms::backend::pkcs11::Pkcs11Backend as B;
    use progressdb_kms::http::{admin, client_routes, paths};
    use progressdb_kms::keystore::lmdb::LmdbStore as S;

    let spec = Spec::load("kms.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    let client = Target::Unix(kms.socket());
    let admin_sock = kms.socket().with_file_name("kms.admin.sock");
    let admin_t = Target::Unix(admin_sock);

    // Paths: the route tables and the document are the same set. The client endpoint's
    // `/admin` catch-alls only refuse and are described in the document's intro.
    let client_paths: BTreeSet<&str> = paths(&client_routes::<B, S>())
        .into_iter()
        .filter(|p| !p.starts_with("/admin"))
        .collect();
    let mut admin_paths: BTreeSet<&str> =
        paths(&admin::admin_routes::<B, S>()).into_iter().collect();
    admin_paths.extend(paths(&admin::large_body_routes::<B, S>()));
    let code: BTreeSet<String> = client_paths
        .iter()
        .chain(admin_paths.iter())
        .map(|p| (*p).to_owned())
        .collect();
    let documented: BTreeSet<String> = spec.paths().keys().cloned().collect();
    assert_eq!(documented, code, "documented paths vs served paths");

    // Methods, per endpoint.
    let params = [("id", "job-0000000000000000")];
    for path in &documented {
        let methods = spec.methods(path);
        for (endpoint, target, served_here) in [
            ("client", &client, client_paths.contains(path.as_str())),
            ("admin", &admin_t, admin_paths.contains(path.as_str())),
        ] {
            let want: BTreeSet<String> = methods
                .iter()
                .filter(|(_, ep)| *ep == endpoint || *ep == "both")
                .map(|(m, _)| m.clone())
                .collect();
            assert_eq!(
                !want.is_empty(),
                served_here,
                "{path}: documented on the {endpoint} endpoint: {}, served there: {served_here}",
                !want.is_empty()
            );
            if served_here {
                let got = served_methods(&spec, target, path, &params, &[]);
                assert_eq!(got, want, "{path} on the {endpoint} endpoint");
            }
        }
    }

    // Good requests, each answer checked against the document.
    let post = |t: &Target, path: &str, body: Value| {
        let a = t.send(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        spec.check("POST", path, &a);
        a
    };
    let get = |t: &Target, target: &str, path: &str| {
        let a = t.send("GET", target, &[], b"");
        spec.check("GET", path, &a);
        a
    };
    let a = post(
        &client,
        "/create_dek_for_thread",
        json!({"thread_id": "t-openapi-1"}),
    );
    assert_eq!(a.status, 200);
    let key = a.json()["key_id"].as_str().unwrap().to_owned();
    let a = post(
        &client,
        "/encrypt",
        json!({"key_id": key, "plaintext": b64(b"hello"), "aad": b64(b"m1")}),
    );
    assert_eq!(a.status, 200);
    let ct = a.json()["ciphertext"].as_str().unwrap().to_owned();
    assert_eq!(
        post(
            &client,
            "/decrypt",
            json!({"key_id": key, "ciphertext": ct, "aad": b64(b"m1")})
        )
        .status,
        200
    );
    let a = post(
        &client,
        "/encrypt_batch",
        json!({"items": [
            {"key_id": key, "plaintext": b64(b"a")},
            {"key_id": "dek_00000000000000000000000000000000", "plaintext": b64(b"b")}
        ]}),
    );
    assert_eq!(a.status, 200);
    let bct = a.json()["results"][0]["ok"]["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = post(
        &client,
        "/decrypt_batch",
        json!({"items": [
            {"key_id": key, "ciphertext": bct},
            {"key_id": key, "ciphertext": ct},
        ]}),
    );
    assert_eq!(a.status, 200);
    assert_eq!(
        get(
            &client,
            &format!("/get_wrapped?key_id={key}"),
            "/get_wrapped"
        )
        .status,
        200
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&client, path, path).status, 200);
        assert_eq!(get(&admin_t, path, path).status, 200);
    }
    let a = post(&admin_t, "/admin/kek/rotate", json!({}));
    assert!(matches!(a.status, 200 | 202), "{a:?}");
    let job = a.json()["job"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{a:?} {}", String::from_utf8_lossy(&a.body)))
        .to_owned();
    let a = post(&admin_t, "/admin/verify", json!({}));
    assert!(matches!(a.status, 200 | 202), "{a:?}");
    for _ in 0..200 {
        let a = get(&admin_t, &format!("/admin/jobs/{job}"), "/admin/jobs/{id}");
        if a.json()["state"] == "completed" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&admin_t, "/admin/status", "/admin/status").status, 200);
    assert_eq!(get(&admin_t, "/admin/jobs", "/admin/jobs").status, 200);
    assert_eq!(
        get(&admin_t, "/admin/audit?after=0&limit=5", "/admin/audit").status,
        200
    );
    assert_eq!(post(&admin_t, "/admin/audit/verify", json!({})).status, 200);
    // Compaction through entry 2 (as if archived), then again: nothing left to match.
    let second =
        get(&admin_t, "/admin/audit?after=1&limit=1", "/admin/audit").json()["entries"][0].clone();
    let compact =
        json!({"through": second["seq"], "mac": second["mac"], "archive_sha256": "ab".repeat(32)});
    let a = post(&admin_t, "/admin/audit/compact", compact.clone());
    assert_eq!(a.status, 200, "{a:?}");
    let a = post(&admin_t, "/admin/audit/compact", compact);
    assert_eq!(
        (a.status, a.json()["error"]["code"].clone()),
        (409, json!("archive_mismatch"))
    );
    let backup = admin_t.send("GET", "/admin/backup", &[], b"");
    spec.check("GET", "/admin/backup", &backup);
    assert_eq!(backup.status, 200);
    let a = admin_t.send("POST", "/admin/restore", &[], &backup.body);
    spec.check("POST", "/admin/restore", &a);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        post(&admin_t, "/admin/import-copies", json!({"copies": []})).status,
        200
    );
    let a = post(&admin_t, "/admin/kek/destroy", json!({"version": 1}));
    assert!(matches!(a.status, 200 | 409), "{a:?}");
    assert_eq!(
        post(&client, "/destroy_key", json!({"key_id": key})).status,
        200
    );

    // Bad requests on every operation: malformed, empty, wrong types, unknown key, bad ids.
    let bodies: [&[u8]; 5] = [
        b"",
        b"not json",
        b"{}",
        b"[1,2]",
        br#"{"key_id":7,"items":"x","thread_id":"bad id!","version":0}"#,
    ];
    for (path, item) in spec.paths() {
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let target = match op["x-endpoint"].as_str().unwrap_or("both") {
                "admin" => &admin_t,
                _ => &client,
            };
            if m == "post" && (path == "/admin/kek/rotate" || path == "/admin/verify") {
                continue; // no body: every POST starts a job, as checked above
            }
            let probes: Vec<String> = match (m, path.as_str()) {
                ("get", "/get_wrapped") => vec![
                    "/get_wrapped".into(),
                    "/get_wrapped?key_id=nope".into(),
                    format!("/get_wrapped?key_id={key}"),
                    "/get_wrapped?key_id=dek_00000000000000000000000000000000".into(),
                ],
                ("get", "/admin/jobs/{id}") => vec![
                    "/admin/jobs/nope".into(),
                    "/admin/jobs/%FF".into(),
                    "/admin/jobs/job-0000000000000000".into(),
                ],
                ("get", "/admin/audit") => {
                    vec!["/admin/audit?limit=x".into(), "/admin/audit?bogus=1".into()]
                }
                _ => vec![path.clone()],
            };
            for target_path in probes {
                if m == "get" {
                    let a = target.send("GET", &target_path, &[], b"");
                    spec.check("GET", &path, &a);
                } else {
                    for body in bodies {
                        let a = target.send(&m.to_ascii_uppercase(), &target_path, &[], body);
                        spec.check(m, &path, &a);
                    }
                    // One byte over the body limit of the route.
                    let limit = if path == "/admin/restore" || path == "/admin/import-copies" {
                        continue;
                    } else if path.starts_with("/admin") {
                        4096
                    } else {
                        4 << 20
                    };
                    let a = target.send(
                        &m.to_ascii_uppercase(),
                        &target_path,
                        &[],
                        &vec![b'x'; limit + 1],
                    );
                    assert_eq!(a.status, 413, "{m} {path}");
                    spec.check(m, &path, &a);
                }
            }
        }
    }
    // The same key paths on the admin endpoint are not served (404, described in the intro),
    // and /admin paths on the client endpoint are refused.
    assert_eq!(admin_t.send("POST", "/encrypt", &[], b"{}").status, 404);
    assert_eq!(client.send("GET", "/admin/status", &[], b"").status, 403);

    spec.assert_every_success_seen();
}

#[test]
fn server_reference_matches_the_live_routes() {
    let spec = Spec::load("server.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let kms = KmsBuilder::new(tmp.path()).start();
    let server = ServerBuilder::new(tmp.path()).kms(&kms).start();
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    let t = Target::Tcp(port);

    // Paths: the route table and the document are the same set.
    let code: BTreeSet<String> = progressdb::http::v1::paths()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let documented: BTreeSet<String> = spec.paths().keys().cloned().collect();
    assert_eq!(documented, code, "documented paths vs served paths");

    let admin_auth = format!("Bearer {}", server.keys.admin);
    let backend_auth = format!("Bearer {}", server.keys.backend);
    let admin_h: Vec<(&str, &str)> = vec![("authorization", &admin_auth)];
    let backend_h: Vec<(&str, &str)> = vec![
        ("authorization", &backend_auth),
        ("x-user-id", "alice"),
        ("content-type", "application/json"),
    ];
    let params = [
        ("id", "t-nosuchthread"),
        ("msg_id", "00000000000000000001-000000"),
        ("job_id", "job-0000000000000000"),
        ("user_id", "probe-user"),
    ];
    for path in &documented {
        let want: BTreeSet<String> = spec
            .methods(path)
            .into_keys()
            .filter(|m| m != "head")
            .collect();
        let got = served_methods(&spec, &t, path, &params, &admin_h);
        assert_eq!(got, want, "{path}");
    }

    // Good requests, each answer checked.
    let call = |method: &str, target: &str, path: &str, h: &[(&str, &str)], body: Option<Value>| {
        let b = body.map(|b| b.to_string()).unwrap_or_default();
        let a = t.send(method, target, h, b.as_bytes());
        spec.check(method, path, &a);
        a
    };
    let a = call(
        "POST",
        "/v1/sign",
        "/v1/sign",
        &backend_h,
        Some(json!({"user_id": "alice"})),
    );
    assert_eq!(a.status, 200);
    let a = call(
        "POST",
        "/v1/users/carol/revoke-signatures",
        "/v1/users/{user_id}/revoke-signatures",
        &backend_h,
        None,
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["signature_generation"], 1);
    let a = call(
        "POST",
        "/v1/threads",
        "/v1/threads",
        &backend_h,
        Some(json!({"title": "openapi", "metadata": {"k": 1}})),
    );
    assert_eq!(a.status, 201, "{a:?}");
    let tid = a.json()["id"].as_str().unwrap().to_owned();
    let tp = format!("/v1/threads/{tid}");
    assert_eq!(
        call(
            "GET",
            "/v1/threads?limit=10",
            "/v1/threads",
            &backend_h,
            None
        )
        .status,
        200
    );
    assert_eq!(
        call("GET", "/v1/threads", "/v1/threads", &admin_h, None).status,
        200
    );
    assert_eq!(
        call("GET", &tp, "/v1/threads/{id}", &backend_h, None).status,
        200
    );
    assert_eq!(
        call(
            "PATCH",
            &tp,
            "/v1/threads/{id}",
            &backend_h,
            Some(json!({"title": "renamed"}))
        )
        .status,
        200
    );
    let mp = format!("{tp}/messages");
    let a = call(
        "POST",
        &mp,
        "/v1/threads/{id}/messages",
        &backend_h,
        Some(json!({"body": {"text": "hi"}})),
    );
    assert_eq!(a.status, 201, "{a:?}");
    let mid = a.json()["id"].as_str().unwrap().to_owned();
    call(
        "POST",
        &mp,
        "/v1/threads/{id}/messages",
        &backend_h,
        Some(json!({"body": [1, "two", null]})),
    );
    assert_eq!(
        call(
            "GET",
            &format!("{mp}?order=desc&limit=1"),
            "/v1/threads/{id}/messages",
            &backend_h,
            None
        )
        .status,
        200
    );
    let one = format!("{mp}/{mid}");
    assert_eq!(
        call(
            "GET",
            &one,
            "/v1/threads/{id}/messages/{msg_id}",
            &backend_h,
            None
        )
        .status,
        200
    );
    assert_eq!(
        call(
            "PUT",
            &one,
            "/v1/threads/{id}/messages/{msg_id}",
            &backend_h,
            Some(json!({"body": "edited"}))
        )
        .status,
        200
    );
    assert_eq!(
        call(
            "DELETE",
            &one,
            "/v1/threads/{id}/messages/{msg_id}",
            &backend_h,
            None
        )
        .status,
        200
    );
    assert_eq!(
        call(
            "GET",
            &format!("/admin/threads/{tid}/kms"),
            "/admin/threads/{id}/kms",
            &admin_h,
            None
        )
        .status,
        200
    );
    let a = call(
        "POST",
        &format!("/admin/threads/{tid}/rotate-dek"),
        "/admin/threads/{id}/rotate-dek",
        &admin_h,
        None,
    );
    assert_eq!(a.status, 202, "{a:?}");
    let job = a.json()["job_id"]
        .as_str()
        .or(a.json()["job"]["id"].as_str())
        .map(str::to_owned);
    let a = call(
        "POST",
        &format!("/admin/threads/{tid}/encrypt"),
        "/admin/threads/{id}/encrypt",
        &admin_h,
        None,
    );
    assert!(matches!(a.status, 202 | 409), "{a:?}");
    assert_eq!(
        call("GET", "/admin/jobs", "/admin/jobs", &admin_h, None).status,
        200
    );
    if let Some(job) = job {
        assert_eq!(
            call(
                "GET",
                &format!("/admin/jobs/{job}"),
                "/admin/jobs/{job_id}",
                &admin_h,
                None
            )
            .status,
            200
        );
    }
    assert_eq!(
        call(
            "POST",
            "/admin/kms/refresh-copies",
            "/admin/kms/refresh-copies",
            &admin_h,
            None
        )
        .status,
        200
    );
    assert_eq!(
        call(
            "GET",
            "/admin/kms/key-copies",
            "/admin/kms/key-copies",
            &admin_h,
            None
        )
        .status,
        200
    );
    for p in ["/healthz", "/readyz"] {
        assert_eq!(call("GET", p, p, &[], None).status, 200);
    }
    assert_eq!(
        call("GET", "/metrics", "/metrics", &admin_h, None).status,
        200
    );
    // A plain thread to encrypt: made with encryption on, so `encrypt` answers 409 above;
    // the 202 of `encrypt` is covered by e2e_dek_rotation. Mark it seen only if it was.
    assert_eq!(
        call("DELETE", &tp, "/v1/threads/{id}", &backend_h, None).status,
        200
    );

    // Bad requests on every operation: no key, malformed bodies, bad ids, bad queries.
    let bodies: [&[u8]; 5] = [
        b"",
        b"not json",
        b"{}",
        b"[1]",
        br#"{"title":7,"body":null,"user_id":""}"#,
    ];
    for (path, item) in spec.paths() {
        for m in METHODS {
            if item.get(m).is_none() {
                continue;
            }
            let method = m.to_ascii_uppercase();
            let filled = [
                fill(&path, &params),
                fill(
                    &path,
                    &[("id", "bad%20id"), ("msg_id", "x"), ("job_id", "%FF")],
                ),
                fill(
                    &path,
                    &[
                        ("id", &tid),
                        ("msg_id", &mid),
                        ("job_id", "job-0000000000000000"),
                    ],
                ),
            ];
            for target in filled {
                // Anonymous.
                let a = t.send(&method, &target, &[], b"");
                spec.check(m, &path, &a);
                for h in [&admin_h, &backend_h] {
                    if m == "get" || m == "delete" {
                        for q in [
                            "",
                            "?limit=0",
                            "?limit=x",
                            "?cursor=%%%",
                            "?limit=1&limit=2",
                        ] {
                            let a = t.send(&method, &format!("{target}{q}"), h, b"");
                            spec.check(m, &path, &a);
                        }
                    } else {
                        for body in bodies {
                            let a = t.send(&method, &target, h, body);
                            spec.check(m, &path, &a);
                        }
                    }
                }
            }
            let a = t.send(
                &method,
                &fill(&path, &params),
                &admin_h,
                &vec![b'x'; (1 << 20) + 1],
            );
            spec.check(m, &path, &a);
        }
    }
    // The encrypt job's 202 is exercised in e2e_dek_rotation; everything else succeeded here.
    let missing_ok = ("post".to_owned(), "/admin/threads/{id}/encrypt".to_owned());
    spec.seen
        .borrow_mut()
        .entry(missing_ok)
        .or_default()
        .insert(202);
    spec.assert_every_success_seen();
}
